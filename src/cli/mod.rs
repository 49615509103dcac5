//! The binary's command line: plugin mode for Nomad, plus `run` and `qmp` for operators.

pub mod qmp;
pub mod run;

use std::borrow::Cow;

use clap::{Parser, Subcommand};

/// QEMU task driver for Nomad. Started by a Nomad client agent without a subcommand, it serves
/// the driver plugin protocol; the subcommands work without Nomad.
#[derive(Debug, Parser)]
#[command(name = "nomad-driver-qemu", version, about)]
pub struct Cli {
    /// Driver name reported to Nomad (default: derived from the binary's file name).
    #[arg(long, env = "NOMAD_DRIVER_QEMU_NAME")]
    pub plugin_name: Option<String>,

    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Operator subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Boot one VM in the foreground, print its state changes and stats, stop it gracefully
    /// on Ctrl-C, SIGTERM, SIGHUP or SIGQUIT.
    Run(Box<run::RunArgs>),
    /// Send one QMP command to a running VM's QMP socket and print the reply.
    Qmp(qmp::QmpArgs),
}

/// Runs the command that `cli` selects.
///
/// Control characters in the returned error are escaped, because its messages can carry text
/// from QEMU or the guest, and the caller prints it to a terminal.
pub fn dispatch(cli: Cli) -> anyhow::Result<()> {
    let result = match cli.command {
        None => crate::driver::nomad::plugin::run_plugin(cli.plugin_name),
        Some(Command::Run(args)) => run::main(*args),
        Some(Command::Qmp(args)) => qmp::main(args),
    };
    result.map_err(escape_error)
}

/// Escapes control characters other than tab and newline, such as ESC and carriage return, as
/// Rust escapes them (`\u{1b}`), so that text from QEMU or the guest cannot move the cursor,
/// overwrite a line or recolour the terminal.
pub(crate) fn escape_control(text: &str) -> Cow<'_, str> {
    if !text.chars().any(is_escaped) {
        return Cow::Borrowed(text);
    }
    let mut escaped = String::with_capacity(text.len() + 8);
    for character in text.chars() {
        if is_escaped(character) {
            escaped.extend(character.escape_default());
        } else {
            escaped.push(character);
        }
    }
    Cow::Owned(escaped)
}

fn is_escaped(character: char) -> bool {
    character.is_control() && character != '\t' && character != '\n'
}

/// Rebuilds `error` with every message of its chain passed through [`escape_control`], keeping
/// the chain's order so that it prints as before.
fn escape_error(error: anyhow::Error) -> anyhow::Error {
    let messages: Vec<String> = error
        .chain()
        .map(|cause| escape_control(&cause.to_string()).into_owned())
        .collect();
    let mut messages = messages.into_iter().rev();
    let Some(root) = messages.next() else {
        return error;
    };
    messages.fold(anyhow::Error::msg(root), |chain, message| {
        chain.context(message)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_control_esc() {
        assert_eq!(
            escape_control("\u{1b}[31mred\u{1b}[0m"),
            "\\u{1b}[31mred\\u{1b}[0m"
        );
    }

    #[test]
    fn escape_control_keeps_text() {
        let text = "Linux version 6.1 \t — ok";
        assert!(matches!(escape_control(text), Cow::Borrowed(_)));
    }

    #[test]
    fn escape_control_c1_and_return() {
        assert_eq!(escape_control("a\u{9b}b\nc\r"), "a\\u{9b}b\nc\\r");
    }

    #[test]
    fn escape_error_chain() {
        let error = anyhow::Error::msg("bad \u{7}bell")
            .context("QMP command \"x\" failed")
            .context("outer");
        let escaped = escape_error(error);
        let messages: Vec<String> = escaped.chain().map(ToString::to_string).collect();
        assert_eq!(
            messages,
            ["outer", "QMP command \"x\" failed", "bad \\u{7}bell"]
        );
    }
}
