//! A QMP test double: a tiny stand-in for `qemu-system-*` that runs no guest but speaks QMP on
//! the listening socket the driver passes, so one plugin can manage hundreds of "VMs" cheaply.
//!
//! It takes the flags this driver passes to QEMU and reads two of them:
//! `-chardev socket,id=ID,fd=N,server=on,wait=off` (an inherited listening socket, one per QMP
//! monitor, each served by its own thread) and `-name guest=NAME` (returned by `query-name`).
//! Every other flag is accepted and ignored.
//! `--version` prints a QEMU-like version line.
//!
//! On each socket it accepts one client at a time, like QEMU's QMP monitor, sends the greeting
//! and replies to `qmp_capabilities`, `query-version`, `query-status`, `query-name`, `query-kvm`,
//! `query-cpus-fast`, `query-blockstats`, `query-balloon` (`DeviceNotActive`, as QEMU without
//! a balloon device), `stop`, `cont`, `system_powerdown` and `quit`. `system_powerdown` is
//! answered with `POWERDOWN`, the reply, then `SHUTDOWN` (`guest-shutdown`), and the process
//! exits 0, as a guest that powers off at once. `quit` ends the same way with `host-qmp-quit`.
//! Any other command gets QEMU's `CommandNotFound` error.
//!
//! Use: build it with `cargo build --release --example qmp_double`, link it as
//! `qemu-system-double` into a directory on the plugin's `PATH`, and give tasks
//! `emulator = "double"`.

use std::io::{self, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

/// Version reported in the greeting, by `query-version` and by `--version`.
const VERSION: (u64, u64, u64) = (7, 2, 0);

/// Package string reported next to the version.
const PACKAGE: &str = "qmp-double";

/// What the flags of the command line set.
#[derive(Debug)]
struct Options {
    /// Numbers of the inherited listening sockets, from each `-chardev ...,fd=N`.
    qmp_fds: Vec<i32>,
    /// VM name from `-name`, or an empty string without it.
    name: String,
}

/// How one client session ended.
enum SessionEnd {
    /// The client closed the connection: wait for the next one.
    Disconnected,
    /// The "guest" shut down: the process exits.
    Shutdown,
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|arg| arg == "--version") {
        let (major, minor, micro) = VERSION;
        println!("QEMU emulator version {major}.{minor}.{micro} ({PACKAGE})");
        return ExitCode::SUCCESS;
    }

    let options = match parse_options(&args) {
        Ok(options) => options,
        Err(message) => {
            eprintln!("qmp_double: {message}");
            return ExitCode::from(1);
        }
    };
    match serve(&options) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("qmp_double: {error}");
            ExitCode::from(1)
        }
    }
}

fn parse_options(args: &[String]) -> Result<Options, String> {
    let mut qmp_fds = Vec::new();
    let mut name = String::new();
    let mut pairs = args.iter();
    while let Some(flag) = pairs.next() {
        match flag.as_str() {
            "-chardev" => {
                let value = pairs
                    .next()
                    .ok_or("-chardev has no value; pass -chardev socket,id=ID,fd=N,server=on")?;
                if let Some(fd) = option_value(value, "fd") {
                    let fd = fd.parse::<i32>().map_err(|_| {
                        format!("-chardev {value:?} has an invalid fd {fd:?}: expected a number")
                    })?;
                    qmp_fds.push(fd);
                }
            }
            "-name" => {
                let value = pairs.next().ok_or("-name has no value")?;
                name = option_value(value, "guest")
                    .unwrap_or(value.split(',').next().unwrap_or_default())
                    .to_owned();
            }
            _ => {}
        }
    }
    if qmp_fds.is_empty() {
        return Err(
            "no QMP socket: pass -chardev socket,id=ID,fd=N,server=on,wait=off with an \
             inherited listening Unix socket as fd N"
                .into(),
        );
    }
    Ok(Options { qmp_fds, name })
}

/// Returns the value of `key=value` in a QEMU option list such as `socket,id=qmp0,fd=3`.
fn option_value<'a>(list: &'a str, key: &str) -> Option<&'a str> {
    list.split(',')
        .find_map(|part| part.strip_prefix(key)?.strip_prefix('='))
}

/// Adopts the inherited sockets and serves each in its own thread until a shutdown, which
/// exits the process.
fn serve(options: &Options) -> io::Result<()> {
    let listeners = options
        .qmp_fds
        .iter()
        .map(|&fd| inherited_listener(fd))
        .collect::<io::Result<Vec<_>>>()?;
    let paused = &AtomicBool::new(false);
    std::thread::scope(|scope| {
        let monitors: Vec<_> = listeners
            .into_iter()
            .map(|listener| scope.spawn(move || monitor(&listener, options, paused)))
            .collect();
        for monitor in monitors {
            monitor
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("a monitor thread panicked")))?;
        }
        Ok(())
    })
}

/// Accepts clients on one QMP socket, one at a time, until a shutdown or an accept error.
fn monitor(listener: &UnixListener, options: &Options, paused: &AtomicBool) -> io::Result<()> {
    loop {
        let (stream, _) = listener.accept()?;
        match session(stream, options, paused) {
            Ok(SessionEnd::Shutdown) => std::process::exit(0),
            Ok(SessionEnd::Disconnected) => continue,
            // Like QEMU, a client that goes away mid-session only ends that session.
            Err(error) if is_disconnect(&error) => continue,
            Err(error) => return Err(error),
        }
    }
}

/// Takes ownership of the listening Unix socket at `fd` through the socket activation
/// convention that the `listenfd` crate reads: `LISTEN_FDS` sockets starting at
/// `LISTEN_FDS_FIRST_FD`. The crate checks that `fd` is a Unix stream socket.
fn inherited_listener(fd: i32) -> io::Result<UnixListener> {
    std::env::set_var("LISTEN_FDS", "1");
    std::env::set_var("LISTEN_FDS_FIRST_FD", fd.to_string());
    std::env::remove_var("LISTEN_PID");
    listenfd::ListenFd::from_env()
        .take_unix_listener(0)?
        .ok_or_else(|| io::Error::other(format!("fd {fd} is not an inherited socket")))
}

fn session(stream: UnixStream, options: &Options, paused: &AtomicBool) -> io::Result<SessionEnd> {
    let mut writer = stream.try_clone()?;
    let reader = BufReader::new(stream);
    let (major, minor, micro) = VERSION;
    let version = json!({
        "qemu": {"micro": micro, "minor": minor, "major": major},
        "package": PACKAGE,
    });
    send(
        &mut writer,
        &json!({"QMP": {"version": version, "capabilities": ["oob"]}}),
    )?;

    let mut negotiated = false;
    // Like QEMU, read a stream of JSON values: clients need not end a command with a newline.
    let requests = serde_json::Deserializer::from_reader(reader).into_iter::<Value>();
    for request in requests {
        let request = match request {
            Ok(request) => request,
            Err(error) if error.is_io() => return Err(error.into()),
            Err(error) => {
                // NOTE: QEMU skips to the next valid value after a syntax error. This double
                // cannot find where that is, so it replies and ends the session instead.
                let reply = error_reply("GenericError", &format!("JSON parse error, {error}"));
                send(&mut writer, &reply)?;
                return Ok(SessionEnd::Disconnected);
            }
        };
        let id = request.get("id").cloned();
        let command = request
            .get("execute")
            .and_then(Value::as_str)
            .unwrap_or_default();

        if !negotiated && command != "qmp_capabilities" {
            let reply = error_reply(
                "CommandNotFound",
                "Expecting capabilities negotiation with 'qmp_capabilities'",
            );
            send(&mut writer, &with_id(reply, id))?;
            continue;
        }

        let reply = match command {
            "qmp_capabilities" => {
                negotiated = true;
                json!({"return": {}})
            }
            "query-version" => json!({"return": version}),
            "query-status" => {
                let running = !paused.load(Ordering::SeqCst);
                let status = if running { "running" } else { "paused" };
                json!({"return": {"status": status, "singlestep": false, "running": running}})
            }
            "query-name" if options.name.is_empty() => json!({"return": {}}),
            "query-name" => json!({"return": {"name": options.name}}),
            "query-kvm" => json!({"return": {"enabled": false, "present": false}}),
            "query-cpus-fast" => json!({"return": [{
                "cpu-index": 0,
                "qom-path": "/machine/unattached/device[0]",
                "thread-id": std::process::id(),
                "target": "x86_64",
                "props": {"core-id": 0, "thread-id": 0, "socket-id": 0},
            }]}),
            "query-blockstats" => json!({"return": [{
                "device": "image0",
                "stats": {"rd_bytes": 0, "wr_bytes": 0, "rd_operations": 0, "wr_operations": 0},
            }]}),
            "query-balloon" => {
                error_reply("DeviceNotActive", "No balloon device has been activated")
            }
            "stop" => {
                paused.store(true, Ordering::SeqCst);
                send(&mut writer, &event("STOP", None))?;
                json!({"return": {}})
            }
            "cont" => {
                paused.store(false, Ordering::SeqCst);
                send(&mut writer, &event("RESUME", None))?;
                json!({"return": {}})
            }
            "system_powerdown" => {
                send(&mut writer, &event("POWERDOWN", None))?;
                send(&mut writer, &with_id(json!({"return": {}}), id))?;
                let details = json!({"guest": true, "reason": "guest-shutdown"});
                send(&mut writer, &event("SHUTDOWN", Some(details)))?;
                return Ok(SessionEnd::Shutdown);
            }
            "quit" => {
                send(&mut writer, &with_id(json!({"return": {}}), id))?;
                let details = json!({"guest": false, "reason": "host-qmp-quit"});
                send(&mut writer, &event("SHUTDOWN", Some(details)))?;
                return Ok(SessionEnd::Shutdown);
            }
            other => error_reply(
                "CommandNotFound",
                &format!("The command {other} has not been found"),
            ),
        };
        send(&mut writer, &with_id(reply, id))?;
    }
    Ok(SessionEnd::Disconnected)
}

fn is_disconnect(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset | io::ErrorKind::UnexpectedEof
    )
}

fn send(writer: &mut UnixStream, message: &Value) -> io::Result<()> {
    let mut line = message.to_string();
    line.push_str("\r\n");
    writer.write_all(line.as_bytes())
}

fn with_id(mut reply: Value, id: Option<Value>) -> Value {
    if let (Some(id), Some(map)) = (id, reply.as_object_mut()) {
        map.insert("id".into(), id);
    }
    reply
}

fn error_reply(class: &str, description: &str) -> Value {
    json!({"error": {"class": class, "desc": description}})
}

fn event(name: &str, data: Option<Value>) -> Value {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let mut message = json!({
        "timestamp": {"seconds": now.as_secs(), "microseconds": now.subsec_micros()},
        "event": name,
    });
    if let (Some(data), Some(map)) = (data, message.as_object_mut()) {
        map.insert("data".into(), data);
    }
    message
}
