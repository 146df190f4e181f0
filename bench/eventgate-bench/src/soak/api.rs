//! The REST calls the soak makes on one node, with the account token:
//! status and JSON body back, or why there was no answer.

use std::time::Duration;

use serde_json::Value;

/// A REST client of one node.
#[derive(Clone)]
pub(crate) struct Api {
    client: reqwest::Client,
    base: String,
    token: String,
}

impl Api {
    pub(crate) fn new(client: reqwest::Client, port: u16, token: &str) -> Api {
        Api {
            client,
            base: format!("http://127.0.0.1:{port}"),
            token: token.to_string(),
        }
    }

    /// `method path` with the token and, when given, a JSON body.
    pub(crate) async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> Result<(u16, Value), String> {
        let method = reqwest::Method::from_bytes(method.as_bytes()).map_err(|e| e.to_string())?;
        let mut req = self
            .client
            .request(method, format!("{}{path}", self.base))
            .header("token", &self.token);
        if let Some(body) = body {
            req = req
                .header("content-type", "application/json")
                .body(body.to_string());
        }
        let res = req.send().await.map_err(|e| format!("{path}: {e}"))?;
        let status = res.status().as_u16();
        let bytes = res.bytes().await.map_err(|e| format!("{path}: {e}"))?;
        let value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Ok((status, value))
    }

    /// The node's `/metrics` text.
    pub(crate) async fn metrics(&self) -> Result<String, String> {
        let req = self
            .client
            .get(format!("{}/metrics", self.base))
            .timeout(Duration::from_secs(2));
        let res = req.send().await.map_err(|e| e.to_string())?;
        res.text().await.map_err(|e| e.to_string())
    }

    /// Whether `/readyz` answers 200 within a second.
    pub(crate) async fn ready(&self) -> bool {
        let req = self
            .client
            .get(format!("{}/readyz", self.base))
            .timeout(Duration::from_secs(1));
        matches!(req.send().await, Ok(r) if r.status().as_u16() == 200)
    }
}
