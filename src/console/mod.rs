//! The console of contract §13: a web page, served from the binary, for
//! watching an instance's events and editing its settings and webhooks.
//!
//! Owns the page's assets (compiled in with `include_str!`/`include_bytes!`,
//! nothing fetched from anywhere else), their content types and the headers
//! every console reply carries. It must not touch storage, actors or tokens:
//! the page talks to the gateway only through the public API, like any other
//! client, and the HTTP handlers in `crate::http::console` only hand these
//! bytes out.

/// The Content-Security-Policy of every console reply (contract §13).
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; connect-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'";

/// One compiled-in file of the console.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Asset {
    /// The path it is served under, e.g. `/console/app.js`.
    pub path: &'static str,
    /// Its `Content-Type`.
    pub content_type: &'static str,
    /// The bytes as compiled in.
    pub body: &'static [u8],
}

/// The page itself, served at `GET /console`.
pub const PAGE: Asset = Asset {
    path: "/console",
    content_type: "text/html; charset=utf-8",
    body: include_bytes!("assets/index.html"),
};

/// The icon browsers ask for at `/favicon.ico` (a PNG in an ICO container).
pub const FAVICON_ICO: Asset = Asset {
    path: "/favicon.ico",
    content_type: "image/x-icon",
    body: include_bytes!("assets/favicon.ico"),
};

/// The assets under `/console/`: the page's script, the client library it
/// runs on (the same file as `clients/js/index.js`), its style and icon.
pub const ASSETS: [Asset; 4] = [
    Asset {
        path: "/console/app.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_bytes!("assets/app.js"),
    },
    Asset {
        path: "/console/client.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_bytes!("../../clients/js/index.js"),
    },
    Asset {
        path: "/console/style.css",
        content_type: "text/css; charset=utf-8",
        body: include_bytes!("assets/style.css"),
    },
    Asset {
        path: "/console/favicon.png",
        content_type: "image/png",
        body: include_bytes!("assets/favicon.png"),
    },
];

/// The asset served at `path` (`/console/<file>`), if there is one.
pub fn asset(path: &str) -> Option<&'static Asset> {
    ASSETS.iter().find(|a| a.path == path)
}

/// Every file the console serves: the page, its assets and the favicon.
pub fn all() -> impl Iterator<Item = &'static Asset> {
    std::iter::once(&PAGE)
        .chain(ASSETS.iter())
        .chain(std::iter::once(&FAVICON_ICO))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assets_are_found_by_path_only() {
        assert_eq!(
            asset("/console/app.js").map(|a| a.path),
            Some("/console/app.js")
        );
        assert!(asset("/console/").is_none());
        assert!(asset("/console/../Cargo.toml").is_none());
        assert_eq!(all().count(), 6);
    }

    #[test]
    fn the_page_names_only_its_own_assets() {
        let page = std::str::from_utf8(PAGE.body).unwrap_or_default();
        for asset in ASSETS.iter().filter(|a| a.path != "/console/client.js") {
            assert!(page.contains(asset.path), "{} not referenced", asset.path);
        }
    }
}
