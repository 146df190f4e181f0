//! The `eventgate` binary: parses the command line, loads settings, sets up
//! logging and runs the chosen command. The work is in the library.

use clap::Parser;
use eventgate::cli::{AccountCommand, Cli, Command, InstanceCommand};
use eventgate::domain::{AccountId, InstanceName};
use eventgate::settings::{Loaded, Settings};
use eventgate::{auth, storage};

fn init_logging(settings: &Settings) {
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| settings.log.level.clone());
    let mut builder = env_logger::Builder::new();
    builder.parse_filters(&filter);
    // The journal stamps each line itself.
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        builder.format_timestamp(None);
    }
    builder.init();
}

fn main() {
    exit_now(run_command());
}

/// Ends the process with `code` once everything is written, without the C
/// library's exit handlers: libpq's OpenSSL registers one that frees its
/// state while connection-pool threads may still be closing TLS connections,
/// which can crash a process that had shut down cleanly.
fn exit_now(code: u8) -> ! {
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    // SAFETY: `_exit` only ends the process; every buffer we own was flushed above.
    unsafe { libc::_exit(i32::from(code)) }
}

fn run_command() -> u8 {
    let cli = Cli::parse();
    let loaded = match Loaded::from_process(cli.config.as_deref()) {
        Ok(loaded) => loaded,
        Err(e) => {
            eprintln!("eventgate: {e}");
            return 2;
        }
    };
    let settings = loaded.settings.clone();
    init_logging(&settings);
    let outcome = match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => serve(settings, cli.config),
        Command::Migrate => eventgate::open_connection(&settings)
            .map(|_| println!("migrations applied"))
            .map_err(|e| e.to_string()),
        Command::CheckConfig => loaded
            .report()
            .map(|text| print!("{text}"))
            .map_err(|e| e.to_string()),
        Command::Account(cmd) => account(&settings, cmd),
        Command::Instance(cmd) => instance(&settings, cmd),
    };
    match outcome {
        Ok(()) => 0,
        Err(e) => {
            log::error!("{e}");
            eprintln!("eventgate: {e}");
            1
        }
    }
}

fn serve(settings: Settings, config: Option<std::path::PathBuf>) -> Result<(), String> {
    let listener = std::net::TcpListener::bind(settings.bind_addr().map_err(|e| e.to_string())?)
        .map_err(|e| format!("cannot bind {}: {e}", settings.server.bind))?;
    actix_web::rt::System::new()
        .block_on(eventgate::serve(settings, listener, config))
        .map_err(|e| e.to_string())
}

/// One connection is all a command needs.
fn connection(settings: &Settings) -> Result<storage::DbConn, String> {
    eventgate::open_connection(settings).map_err(|e| e.to_string())
}

fn account(settings: &Settings, cmd: AccountCommand) -> Result<(), String> {
    let mut conn = connection(settings)?;
    match cmd {
        AccountCommand::Create { name } => {
            let token = auth::generate_token();
            let id = storage::accounts::create(&mut conn, &name, &auth::token_hash(&token))
                .map_err(|e| e.to_string())?;
            println!(
                "account {} created (id {}). Its TokenAccount, shown only now:",
                name, id.0
            );
            println!("{token}");
        }
        AccountCommand::List => {
            for row in storage::accounts::list(&mut conn).map_err(|e| e.to_string())? {
                println!("{}\t{}", row.id.0, row.name);
            }
        }
    }
    Ok(())
}

fn instance(settings: &Settings, cmd: InstanceCommand) -> Result<(), String> {
    let mut conn = connection(settings)?;
    match cmd {
        InstanceCommand::Create { account, name } => {
            let name = InstanceName::parse(&name).ok_or(
                "instance names are 1-64 of A-Z a-z 0-9 _ . - starting with a letter or digit",
            )?;
            let token = auth::generate_token();
            let rec = storage::instances::create(
                &mut conn,
                AccountId(account),
                &name,
                &token,
                &auth::token_hash(&token),
                None,
            )
            .map_err(|e| e.to_string())?;
            println!(
                "instance {} created in account {account}. Its TokenInstance:",
                rec.name
            );
            println!("{}", rec.token);
        }
        InstanceCommand::List { account } => {
            let rows = match account {
                Some(a) => storage::instances::list(&mut conn, AccountId(a)),
                None => storage::instances::list_all(&mut conn),
            }
            .map_err(|e| e.to_string())?;
            for rec in rows {
                let ws = match &rec.config {
                    Some(c) if c.config.enabled => "enabled",
                    Some(_) => "disabled",
                    None => "unconfigured",
                };
                println!("{}\t{}\t{}", rec.account.0, rec.name, ws);
            }
        }
        InstanceCommand::Delete { account, name } => {
            match storage::instances::delete(&mut conn, AccountId(account), &name)
                .map_err(|e| e.to_string())?
            {
                Some(rec) => println!("instance {} deleted", rec.name),
                None => return Err(format!("no instance {name} in account {account}")),
            }
        }
    }
    Ok(())
}
