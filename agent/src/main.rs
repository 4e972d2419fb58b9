//! edge-agent binary: reads the config, runs until SIGINT/SIGTERM, re-reads the config on SIGHUP.
//!
//! Stop (SIGTERM from `systemctl stop`, or Ctrl-C): the local API answers what is in flight and
//! closes, the MQTT session and updater end (the outbox keeps what the server has not
//! acknowledged), every telemetry record offered so far is written, then the process exits 0.
//!
//! Reload (SIGHUP from `systemctl reload`): the agent's tasks take their settings when they start
//! (URLs, intervals, limits, labels, the pinned CA and the root are read once), so a reload
//! restarts those tasks inside this process with the new file. The file is loaded and checked
//! first: one that does not load is refused with one log line and the running agent carries on
//! as it was, where a restart would have stopped the device. While the tasks restart the local
//! API is closed for as long as the installed models take to verify and load again.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Parser;
use edge_agent::AgentConfig;
use tokio::signal::unix::{signal, Signal, SignalKind};

/// Edge agent: pulls signed model bundles, serves local inference, reports drift and health.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Path to the TOML config (see agent/edge-agent.example.toml; the .deb installs
    /// /etc/edge-agent/agent.toml).
    #[arg(long, short, env = "EDGE_AGENT_CONFIG", default_value = "/etc/edge-agent/agent.toml")]
    config: PathBuf,
    /// Log lines as text (the journal's format under systemd) or one JSON object per line.
    #[arg(long, env = "EDGE_AGENT_LOG_FORMAT", value_enum, default_value = "text")]
    log_format: LogFormat,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// Exit status for a config that does not load (sysexits' EX_CONFIG): the systemd unit does not
/// restart on it, since only editing the file helps; `systemctl status` shows `78/CONFIG`.
const EX_CONFIG: i32 = 78;

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    init_logging(args.log_format);
    // Read before the runtime exists: no file I/O on its threads.
    let config = match AgentConfig::load(&args.config) {
        Ok(config) => config,
        Err(e) => {
            tracing::error!("{e}");
            std::process::exit(EX_CONFIG);
        }
    };
    tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(run(args.config, config))
}

/// A start-up failure that only a change to the config can cure.
fn is_config_error(e: &edge_agent::StartError) -> bool {
    matches!(e, edge_agent::StartError::Config(_) | edge_agent::StartError::NoToken)
}

/// How log lines are written, decided from where stdout goes.
#[derive(Debug, PartialEq, Eq)]
struct LogStyle {
    /// Colour codes: only for a person at a terminal, and not when `NO_COLOR` is set.
    ansi: bool,
    /// The journal stamps every line itself and reads a `<N>` syslog priority at its start
    /// (so `journalctl -p warning` works); elsewhere lines carry their own timestamp.
    journal: bool,
}

/// `journal_stream` is `$JOURNAL_STREAM` ("device:inode" of the journal's socket, set by
/// systemd); `stdout_id` is stdout's (device, inode). A child whose stdout was redirected
/// inherits the variable, hence the comparison.
fn log_style(
    stdout_is_terminal: bool,
    no_color: Option<&str>,
    journal_stream: Option<&str>,
    stdout_id: Option<(u64, u64)>,
) -> LogStyle {
    let journal = match (journal_stream, stdout_id) {
        (Some(stream), Some((dev, ino))) => stream == format!("{dev}:{ino}"),
        _ => false,
    };
    let ansi = stdout_is_terminal && no_color.is_none_or(str::is_empty) && !journal;
    LogStyle { ansi, journal }
}

fn stdout_id() -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    // stat through /proc follows fd 1 to the socket or file it is, without unsafe code.
    let meta = std::fs::metadata("/proc/self/fd/1").ok()?;
    Some((meta.dev(), meta.ino()))
}

fn init_logging(format: LogFormat) {
    let style = log_style(
        std::io::stdout().is_terminal(),
        std::env::var("NO_COLOR").ok().as_deref(),
        std::env::var("JOURNAL_STREAM").ok().as_deref(),
        stdout_id(),
    );
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(style.ansi);
    if format == LogFormat::Json {
        builder.json().with_ansi(false).init();
    } else if style.journal {
        builder.without_time().event_format(journal::Prefixed(tracing_subscriber::fmt::format().without_time())).init();
    } else {
        builder.init();
    }
}

mod journal {
    //! The syslog priority prefix the journal reads from a service's stdout (sd-daemon(3)).

    use tracing::{Event, Level, Subscriber};
    use tracing_subscriber::fmt::format::Writer;
    use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
    use tracing_subscriber::registry::LookupSpan;

    pub fn priority(level: &Level) -> u8 {
        match *level {
            Level::ERROR => 3,
            Level::WARN => 4,
            Level::INFO => 6,
            _ => 7,
        }
    }

    /// Writes `<N>` before each line of the inner format.
    pub struct Prefixed<F>(pub F);

    impl<S, N, F> FormatEvent<S, N> for Prefixed<F>
    where
        S: Subscriber + for<'a> LookupSpan<'a>,
        N: for<'a> FormatFields<'a> + 'static,
        F: FormatEvent<S, N>,
    {
        fn format_event(
            &self,
            ctx: &FmtContext<'_, S, N>,
            mut writer: Writer<'_>,
            event: &Event<'_>,
        ) -> std::fmt::Result {
            write!(writer, "<{}>", priority(event.metadata().level()))?;
            self.0.format_event(ctx, writer, event)
        }
    }
}

/// What the signals ask for.
enum Request {
    Stop,
    Reload,
}

struct Signals {
    term: Signal,
    hangup: Signal,
}

impl Signals {
    fn install() -> std::io::Result<Signals> {
        Ok(Signals { term: signal(SignalKind::terminate())?, hangup: signal(SignalKind::hangup())? })
    }

    async fn next(&mut self) -> Request {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => Request::Stop,
            _ = self.term.recv() => Request::Stop,
            _ = self.hangup.recv() => Request::Reload,
        }
    }
}

async fn run(path: PathBuf, config: AgentConfig) -> anyhow::Result<()> {
    // Installed before the agent starts, so a SIGHUP sent right after start is not fatal.
    let mut signals = Signals::install()?;
    let mut running = config;
    let mut agent = match edge_agent::start(running.clone()).await {
        Ok(agent) => agent,
        Err(e) if is_config_error(&e) => {
            tracing::error!("{e}");
            std::process::exit(EX_CONFIG);
        }
        Err(e) => return Err(anyhow::Error::new(e).context("edge-agent failed to start")),
    };
    tracing::info!(api = %agent.api_addr, config = %path.display(), "edge-agent running");
    loop {
        match signals.next().await {
            Request::Stop => {
                tracing::info!("stopping: finishing requests in flight and writing buffered telemetry");
                agent.shutdown().await;
                tracing::info!("stopped");
                return Ok(());
            }
            Request::Reload => {
                let loaded = load_off_runtime(&path).await;
                let new = match loaded {
                    Ok(new) => new,
                    Err(e) => {
                        tracing::error!("reload refused, the agent keeps running as it was: {e:#}");
                        continue;
                    }
                };
                agent.shutdown().await;
                agent = match edge_agent::start(new.clone()).await {
                    Ok(agent) => {
                        running = new;
                        tracing::info!(api = %agent.api_addr, config = %path.display(), "config reloaded");
                        agent
                    }
                    Err(e) => {
                        tracing::error!(
                            "the reloaded config did not start ({e}); starting again with the previous one"
                        );
                        edge_agent::start(running.clone()).await.context("edge-agent failed to start again")?
                    }
                };
            }
        }
    }
}

/// Reads and checks the config on a blocking thread: the runtime's workers do no file I/O.
async fn load_off_runtime(path: &Path) -> anyhow::Result<AgentConfig> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || AgentConfig::load(&path)).await?.map_err(anyhow::Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_terminal_gets_colours_and_timestamps() {
        assert_eq!(log_style(true, None, None, Some((1, 2))), LogStyle { ansi: true, journal: false });
    }

    #[test]
    fn a_pipe_or_file_gets_plain_lines() {
        assert_eq!(log_style(false, None, None, Some((1, 2))), LogStyle { ansi: false, journal: false });
    }

    #[test]
    fn no_color_turns_colours_off_even_at_a_terminal() {
        assert_eq!(log_style(true, Some("1"), None, None), LogStyle { ansi: false, journal: false });
        assert!(log_style(true, Some(""), None, None).ansi, "an empty NO_COLOR does not count");
    }

    #[test]
    fn stdout_connected_to_the_journal_gets_priorities_and_no_colours() {
        assert_eq!(log_style(false, None, Some("8:4711"), Some((8, 4711))), LogStyle { ansi: false, journal: true });
    }

    #[test]
    fn an_inherited_journal_stream_does_not_count_when_stdout_was_redirected() {
        assert_eq!(log_style(false, None, Some("8:4711"), Some((8, 99))), LogStyle { ansi: false, journal: false });
    }

    #[test]
    fn each_level_maps_to_its_syslog_priority() {
        use tracing::Level;
        let got: Vec<u8> = [Level::ERROR, Level::WARN, Level::INFO, Level::DEBUG, Level::TRACE]
            .iter()
            .map(journal::priority)
            .collect();
        assert_eq!(got, [3, 4, 6, 7, 7]);
    }
}
