//! The QEMU command line, built from small typed pieces that each render their own flags.
//!
//! Nothing here touches the host: [`QemuCommandLine::args`] is a pure function of its pieces, so
//! tests assert on the rendered arguments without starting a process. Validation of user input
//! (allowed paths, allowlists) happens in the Nomad config layer before these pieces are built.
//!
//! Option values that QEMU parses as `key=value,...` lists (`-drive`, `-chardev`, `-netdev`,
//! `-machine`, `-name`) have every comma doubled, which is QEMU's escape for a literal comma, so
//! a value can never inject another option.

use std::ffi::{OsStr, OsString};
use std::net::IpAddr;
use std::os::fd::RawFd;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::PathBuf;

/// Chardev id of the guest agent socket, the same as Nomad's built-in qemu driver uses.
pub const GUEST_AGENT_CHARDEV_ID: &str = "qga0";

/// Port name the QEMU guest agent inside the guest looks for.
pub const GUEST_AGENT_PORT_NAME: &str = "org.qemu.guest_agent.0";

/// A full QEMU invocation: the emulator binary and the pieces rendered in order after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuCommandLine {
    /// Path of the `qemu-system-*` binary.
    pub emulator: PathBuf,
    /// Pieces rendered in this order.
    pub pieces: Vec<Piece>,
}

impl QemuCommandLine {
    /// Creates a command line with no pieces.
    pub fn new(emulator: impl Into<PathBuf>) -> Self {
        Self {
            emulator: emulator.into(),
            pieces: Vec::new(),
        }
    }

    /// Appends a piece and returns `self`, for chaining.
    #[must_use]
    pub fn with(mut self, piece: impl Into<Piece>) -> Self {
        self.pieces.push(piece.into());
        self
    }

    /// Appends a piece.
    pub fn push(&mut self, piece: impl Into<Piece>) {
        self.pieces.push(piece.into());
    }

    /// Renders the arguments that follow the emulator path (argv[1..]).
    pub fn args(&self) -> Vec<OsString> {
        let mut args = Vec::new();
        for piece in &self.pieces {
            piece.render(&mut args);
        }
        args
    }
}

/// One part of the command line that renders one or more flags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    /// `-machine type=...,accel=...`.
    Machine(Machine),
    /// `-cpu MODEL`.
    Cpu(String),
    /// `-name guest=NAME`.
    Name(String),
    /// `-m SIZE`.
    Memory(Memory),
    /// `-smp N`.
    Smp(u32),
    /// `-nographic`: no display, serial console on stdio.
    NoGraphic,
    /// `-drive ...`.
    Drive(Drive),
    /// `-kernel`, `-initrd` and `-append`.
    DirectKernel(DirectKernel),
    /// `-netdev user,...` plus its NIC `-device`.
    UserNetwork(UserNetwork),
    /// The guest agent chardev and its virtio-serial port.
    GuestAgent(GuestAgent),
    /// The QMP monitor over an inherited listening socket.
    QmpMonitor(QmpMonitor),
    /// `-no-reboot`: a guest reset (also a kernel panic with `panic=-1`) ends QEMU instead.
    NoReboot,
    /// `-nodefaults`: no default NIC, serial port, monitor or VGA.
    NoDefaults,
    /// Arguments appended exactly as given.
    Extra(Vec<OsString>),
}

impl Piece {
    fn render(&self, args: &mut Vec<OsString>) {
        match self {
            Piece::Machine(machine) => machine.render(args),
            Piece::Cpu(model) => push_pair(args, "-cpu", escape_commas(model)),
            Piece::Name(name) => push_pair(args, "-name", format!("guest={}", escape_commas(name))),
            Piece::Memory(memory) => memory.render(args),
            Piece::Smp(cpus) => push_pair(args, "-smp", cpus.to_string()),
            Piece::NoGraphic => args.push("-nographic".into()),
            Piece::Drive(drive) => drive.render(args),
            Piece::DirectKernel(kernel) => kernel.render(args),
            Piece::UserNetwork(network) => network.render(args),
            Piece::GuestAgent(agent) => agent.render(args),
            Piece::QmpMonitor(monitor) => monitor.render(args),
            Piece::NoReboot => args.push("-no-reboot".into()),
            Piece::NoDefaults => args.push("-nodefaults".into()),
            Piece::Extra(extra) => args.extend(extra.iter().cloned()),
        }
    }
}

/// Machine type and accelerator, rendered `-machine type=pc,accel=tcg` like Nomad's built-in
/// qemu driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Machine {
    /// Machine type, for example `pc` or `q35`.
    pub machine_type: String,
    /// Accelerator, for example `tcg` or `kvm`.
    pub accelerator: String,
}

impl Machine {
    fn render(&self, args: &mut Vec<OsString>) {
        let value = format!(
            "type={},accel={}",
            escape_commas(&self.machine_type),
            escape_commas(&self.accelerator)
        );
        push_pair(args, "-machine", value);
    }
}

impl From<Machine> for Piece {
    fn from(machine: Machine) -> Self {
        Piece::Machine(machine)
    }
}

/// Guest RAM in MiB, rendered `-m 512M`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Memory {
    /// Guest RAM in MiB.
    pub mib: u64,
}

impl Memory {
    fn render(&self, args: &mut Vec<OsString>) {
        push_pair(args, "-m", format!("{}M", self.mib));
    }
}

impl From<Memory> for Piece {
    fn from(memory: Memory) -> Self {
        Piece::Memory(memory)
    }
}

/// A block device: `-drive file=...,if=...[,format=...][,id=...][,readonly=on]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Drive {
    /// Image file. Commas are escaped.
    pub file: PathBuf,
    /// Drive interface, for example `ide` or `virtio`.
    pub interface: String,
    /// Image format, or `None` to let QEMU probe it.
    pub format: Option<String>,
    /// Drive id, so other devices and QMP commands can refer to it.
    pub id: Option<String>,
    /// Attach the image read-only.
    pub read_only: bool,
}

impl Drive {
    /// Creates a read-write drive with a probed format and no id.
    pub fn new(file: impl Into<PathBuf>, interface: impl Into<String>) -> Self {
        Self {
            file: file.into(),
            interface: interface.into(),
            format: None,
            id: None,
            read_only: false,
        }
    }

    fn render(&self, args: &mut Vec<OsString>) {
        let mut value = prefixed_path("file=", self.file.as_os_str());
        value.push(format!(",if={}", escape_commas(&self.interface)));
        if let Some(format) = &self.format {
            value.push(format!(",format={}", escape_commas(format)));
        }
        if let Some(id) = &self.id {
            value.push(format!(",id={}", escape_commas(id)));
        }
        if self.read_only {
            value.push(",readonly=on");
        }
        push_pair(args, "-drive", value);
    }
}

impl From<Drive> for Piece {
    fn from(drive: Drive) -> Self {
        Piece::Drive(drive)
    }
}

/// Direct kernel boot. QEMU takes these three values verbatim, so commas need no escape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirectKernel {
    /// Kernel image (`-kernel`).
    pub kernel: PathBuf,
    /// Initial ramdisk (`-initrd`).
    pub initrd: Option<PathBuf>,
    /// Kernel command line (`-append`).
    pub append: Option<String>,
}

impl DirectKernel {
    fn render(&self, args: &mut Vec<OsString>) {
        push_pair(args, "-kernel", self.kernel.as_os_str());
        if let Some(initrd) = &self.initrd {
            push_pair(args, "-initrd", initrd.as_os_str());
        }
        if let Some(append) = &self.append {
            push_pair(args, "-append", append);
        }
    }
}

impl From<DirectKernel> for Piece {
    fn from(kernel: DirectKernel) -> Self {
        Piece::DirectKernel(kernel)
    }
}

/// Transport protocol of a host forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

impl Protocol {
    fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

/// A user-mode network forward from a host port (all host addresses) to a guest port, rendered
/// `hostfwd=tcp::HOSTPORT-:GUESTPORT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostForward {
    /// Transport protocol.
    pub protocol: Protocol,
    /// Port on the host.
    pub host_port: u16,
    /// Port in the guest.
    pub guest_port: u16,
}

/// A user-mode (slirp) network and its NIC: `-netdev user,id=ID,... -device MODEL,netdev=ID`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserNetwork {
    /// Netdev id, `user.0` in Nomad's built-in driver.
    pub id: String,
    /// NIC model, for example `virtio-net`.
    pub device_model: String,
    /// DNS server address the built-in DHCP server hands out.
    pub dns: Option<IpAddr>,
    /// DNS search domains the DHCP server hands out.
    pub dns_search: Vec<String>,
    /// Host forwards, rendered in order.
    pub forwards: Vec<HostForward>,
}

impl UserNetwork {
    fn render(&self, args: &mut Vec<OsString>) {
        let mut netdev = format!("user,id={}", escape_commas(&self.id));
        if let Some(dns) = self.dns {
            netdev.push_str(&format!(",dns={dns}"));
        }
        for domain in &self.dns_search {
            netdev.push_str(&format!(",dnssearch={}", escape_commas(domain)));
        }
        for forward in &self.forwards {
            netdev.push_str(&format!(
                ",hostfwd={}::{}-:{}",
                forward.protocol.as_str(),
                forward.host_port,
                forward.guest_port
            ));
        }
        push_pair(args, "-netdev", netdev);

        let device = format!(
            "{},netdev={}",
            escape_commas(&self.device_model),
            escape_commas(&self.id)
        );
        push_pair(args, "-device", device);
    }
}

impl From<UserNetwork> for Piece {
    fn from(network: UserNetwork) -> Self {
        Piece::UserNetwork(network)
    }
}

/// The QEMU guest agent channel: a listening unix socket at `socket`, wired to the virtio-serial
/// port the agent inside the guest opens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestAgent {
    /// Socket path. QEMU rejects paths of 108 bytes or more (the `sun_path` limit).
    pub socket: PathBuf,
}

impl GuestAgent {
    fn render(&self, args: &mut Vec<OsString>) {
        let mut chardev = prefixed_path("socket,path=", self.socket.as_os_str());
        chardev.push(format!(",server=on,wait=off,id={GUEST_AGENT_CHARDEV_ID}"));
        push_pair(args, "-chardev", chardev);
        push_pair(args, "-device", "virtio-serial");
        push_pair(
            args,
            "-device",
            format!("virtserialport,chardev={GUEST_AGENT_CHARDEV_ID},name={GUEST_AGENT_PORT_NAME}"),
        );
    }
}

impl From<GuestAgent> for Piece {
    fn from(agent: GuestAgent) -> Self {
        Piece::GuestAgent(agent)
    }
}

/// The QMP monitor on a unix socket that the parent bound and QEMU inherits as fd `fd`.
///
/// Passing the fd sidesteps the 108-byte `sun_path` limit of `-qmp unix:PATH`. QEMU calls
/// `listen()` itself if the parent did not, and does not unlink the socket file on exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QmpMonitor {
    /// Chardev id, unique among the VM's monitors.
    pub id: &'static str,
    /// The inherited socket's fd number in the QEMU process.
    pub fd: RawFd,
}

impl QmpMonitor {
    fn render(&self, args: &mut Vec<OsString>) {
        push_pair(
            args,
            "-chardev",
            format!("socket,id={},fd={},server=on,wait=off", self.id, self.fd),
        );
        push_pair(args, "-mon", format!("chardev={},mode=control", self.id));
    }
}

impl From<QmpMonitor> for Piece {
    fn from(monitor: QmpMonitor) -> Self {
        Piece::QmpMonitor(monitor)
    }
}

/// Doubles every comma, QEMU's escape for a literal comma inside an option value.
pub fn escape_commas(value: &str) -> String {
    value.replace(',', ",,")
}

/// Doubles every comma in a path, which may not be UTF-8.
fn escape_path_commas(value: &OsStr) -> OsString {
    let mut escaped = Vec::with_capacity(value.len());
    for &byte in value.as_bytes() {
        escaped.push(byte);
        if byte == b',' {
            escaped.push(b',');
        }
    }
    OsString::from_vec(escaped)
}

/// Renders `PREFIX` followed by the escaped path.
fn prefixed_path(prefix: &str, path: &OsStr) -> OsString {
    let mut value = OsString::from(prefix);
    value.push(escape_path_commas(path));
    value
}

fn push_pair(args: &mut Vec<OsString>, flag: &str, value: impl Into<OsString>) {
    args.push(flag.into());
    args.push(value.into());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rendered(piece: impl Into<Piece>) -> Vec<String> {
        QemuCommandLine::new("qemu-system-x86_64")
            .with(piece)
            .args()
            .into_iter()
            .map(|arg| arg.into_string().expect("test arguments are UTF-8"))
            .collect()
    }

    #[test]
    fn machine_renders_like_builtin() {
        let machine = Machine {
            machine_type: "pc".into(),
            accelerator: "tcg".into(),
        };
        assert_eq!(rendered(machine), ["-machine", "type=pc,accel=tcg"]);
    }

    #[test]
    fn name_escapes_commas() {
        assert_eq!(
            rendered(Piece::Name("web,debug-threads=on".into())),
            ["-name", "guest=web,,debug-threads=on"]
        );
    }

    #[test]
    fn memory_in_mebibytes() {
        assert_eq!(rendered(Memory { mib: 512 }), ["-m", "512M"]);
    }

    #[test]
    fn simple_flags() {
        assert_eq!(rendered(Piece::Smp(4)), ["-smp", "4"]);
        assert_eq!(rendered(Piece::NoGraphic), ["-nographic"]);
        assert_eq!(rendered(Piece::NoReboot), ["-no-reboot"]);
        assert_eq!(rendered(Piece::NoDefaults), ["-nodefaults"]);
        assert_eq!(rendered(Piece::Cpu("host".into())), ["-cpu", "host"]);
    }

    #[test]
    fn drive_minimal() {
        let drive = Drive::new("/images/linux.img", "ide");
        assert_eq!(rendered(drive), ["-drive", "file=/images/linux.img,if=ide"]);
    }

    #[test]
    fn drive_all_options() {
        let drive = Drive {
            format: Some("qcow2".into()),
            id: Some("image0".into()),
            read_only: true,
            ..Drive::new("disk.qcow2", "virtio")
        };
        assert_eq!(
            rendered(drive),
            [
                "-drive",
                "file=disk.qcow2,if=virtio,format=qcow2,id=image0,readonly=on"
            ]
        );
    }

    #[test]
    fn drive_escapes_comma_in_file() {
        let drive = Drive::new("/images/a,if=none,file=/etc/shadow", "ide");
        assert_eq!(
            rendered(drive),
            ["-drive", "file=/images/a,,if=none,,file=/etc/shadow,if=ide"]
        );
    }

    #[test]
    fn drive_keeps_non_utf8_path() {
        let file = PathBuf::from(OsString::from_vec(b"/images/\xff,x".to_vec()));
        let args = QemuCommandLine::new("qemu")
            .with(Drive::new(file, "ide"))
            .args();
        assert_eq!(args[1].as_bytes(), b"file=/images/\xff,,x,if=ide");
    }

    #[test]
    fn direct_kernel_full() {
        let kernel = DirectKernel {
            kernel: "guest/vmlinuz".into(),
            initrd: Some("guest/initramfs.cpio.gz".into()),
            append: Some("console=ttyS0 quiet panic=-1".into()),
        };
        assert_eq!(
            rendered(kernel),
            [
                "-kernel",
                "guest/vmlinuz",
                "-initrd",
                "guest/initramfs.cpio.gz",
                "-append",
                "console=ttyS0 quiet panic=-1"
            ]
        );
    }

    #[test]
    fn direct_kernel_only() {
        let kernel = DirectKernel {
            kernel: "vmlinuz".into(),
            initrd: None,
            append: None,
        };
        assert_eq!(rendered(kernel), ["-kernel", "vmlinuz"]);
    }

    #[test]
    fn user_network_like_builtin() {
        let network = UserNetwork {
            id: "user.0".into(),
            device_model: "virtio-net".into(),
            dns: Some("10.0.0.53".parse().expect("valid address")),
            dns_search: vec!["example.internal".into(), "svc".into()],
            forwards: vec![
                HostForward {
                    protocol: Protocol::Udp,
                    host_port: 22000,
                    guest_port: 22,
                },
                HostForward {
                    protocol: Protocol::Tcp,
                    host_port: 22000,
                    guest_port: 22,
                },
            ],
        };
        assert_eq!(
            rendered(network),
            [
                "-netdev",
                "user,id=user.0,dns=10.0.0.53,dnssearch=example.internal,dnssearch=svc,\
             hostfwd=udp::22000-:22,hostfwd=tcp::22000-:22",
                "-device",
                "virtio-net,netdev=user.0"
            ]
        );
    }

    #[test]
    fn user_network_without_options() {
        let network = UserNetwork {
            id: "user.0".into(),
            device_model: "virtio-net".into(),
            dns: None,
            dns_search: Vec::new(),
            forwards: Vec::new(),
        };
        assert_eq!(
            rendered(network),
            [
                "-netdev",
                "user,id=user.0",
                "-device",
                "virtio-net,netdev=user.0"
            ]
        );
    }

    #[test]
    fn guest_agent_chardev() {
        let agent = GuestAgent {
            socket: "/alloc/task/qa.sock".into(),
        };
        assert_eq!(
            rendered(agent),
            [
                "-chardev",
                "socket,path=/alloc/task/qa.sock,server=on,wait=off,id=qga0",
                "-device",
                "virtio-serial",
                "-device",
                "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0"
            ]
        );
    }

    #[test]
    fn guest_agent_escapes_comma_in_path() {
        let agent = GuestAgent {
            socket: "/alloc/a,b/qa.sock".into(),
        };
        assert_eq!(
            rendered(agent)[1],
            "socket,path=/alloc/a,,b/qa.sock,server=on,wait=off,id=qga0"
        );
    }

    #[test]
    fn qmp_monitor_inherited_fd() {
        assert_eq!(
            rendered(QmpMonitor { id: "qmp0", fd: 3 }),
            [
                "-chardev",
                "socket,id=qmp0,fd=3,server=on,wait=off",
                "-mon",
                "chardev=qmp0,mode=control"
            ]
        );
    }

    #[test]
    fn extra_args_verbatim() {
        let extra = Piece::Extra(vec![
            "-device".into(),
            "virtio-rng-pci,max-bytes=1024".into(),
        ]);
        assert_eq!(
            rendered(extra),
            ["-device", "virtio-rng-pci,max-bytes=1024"]
        );
    }

    #[test]
    fn pieces_render_in_order() {
        let command = QemuCommandLine::new("/usr/bin/qemu-system-x86_64")
            .with(Machine {
                machine_type: "pc".into(),
                accelerator: "tcg".into(),
            })
            .with(Piece::Name("vm".into()))
            .with(Memory { mib: 128 })
            .with(Piece::NoGraphic)
            .with(Piece::Extra(vec!["-snapshot".into()]));
        let args: Vec<_> = command.args();
        let expected: Vec<OsString> = [
            "-machine",
            "type=pc,accel=tcg",
            "-name",
            "guest=vm",
            "-m",
            "128M",
            "-nographic",
            "-snapshot",
        ]
        .into_iter()
        .map(OsString::from)
        .collect();
        assert_eq!(args, expected);
        assert_eq!(
            command.emulator,
            PathBuf::from("/usr/bin/qemu-system-x86_64")
        );
    }

    #[test]
    fn escape_commas_doubles_each() {
        assert_eq!(escape_commas("a,b,,c"), "a,,b,,,,c");
        assert_eq!(escape_commas("plain"), "plain");
    }
}
