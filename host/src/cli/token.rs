//! `trellis token create|list|revoke`: API tokens, in the controller's state directory.
//! Run on the controller's host by whoever may read its configuration and state: that
//! access is what makes someone an admin of tokens.

use super::TokenCommand;
use crate::api::access::{Role, TokenStore};
use crate::config::DaemonConfig;
use std::path::Path;
use std::process::ExitCode;

fn store(config: &Path) -> anyhow::Result<TokenStore> {
    let cfg = DaemonConfig::load(config).map_err(|p| anyhow::anyhow!("{p}"))?;
    let Some(c) = cfg.controller else {
        anyhow::bail!(
            "{}: no [controller] section: tokens belong to a controller (give its configuration)",
            config.display()
        )
    };
    Ok(TokenStore::in_state_dir(&c.state_dir))
}

pub fn run(cmd: TokenCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        TokenCommand::Create { name, role, config } => {
            let role: Role = role.parse().map_err(|e: String| anyhow::anyhow!(e))?;
            let token = store(&config)?
                .create(&name, role)
                .map_err(|e| anyhow::anyhow!(e))?;
            println!("{token}");
            eprintln!(
                "trellis: token `{name}` ({role}) made; it is shown only now: keep it in a secret store, and pass it with --token or TRELLIS_TOKEN"
            );
        }
        TokenCommand::List { config } => {
            let tokens = store(&config)?.tokens();
            println!("{:<24} {:<9} CREATED", "NAME", "ROLE");
            let now = crate::protocol::now_ms();
            for t in tokens {
                println!(
                    "{:<24} {:<9} {}s ago",
                    t.name,
                    t.role,
                    (now - t.created_ms).max(0) / 1000
                );
            }
        }
        TokenCommand::Revoke { name, config } => {
            store(&config)?
                .revoke(&name)
                .map_err(|e| anyhow::anyhow!(e))?;
            eprintln!(
                "trellis: token `{name}` revoked; it and its browser sessions stop working now"
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
