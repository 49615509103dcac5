//! Unit tests for decoding, validation and the command line, with hand-built cty-msgpack values.

use std::ffi::OsString;
use std::fs;
use std::os::unix::fs::symlink;
use std::path::PathBuf;
use std::time::Duration;

use rmpv::Value;

use super::*;

/// Builds a root map with every task option set to `nil`, then applies `set`. The last entry
/// for a key wins.
fn task_value(set: &[(&str, Value)]) -> Value {
    let entries = TASK_OPTIONS
        .iter()
        .map(|key| {
            let value = set
                .iter()
                .rev()
                .find(|(name, _)| name == key)
                .map(|(_, value)| value.clone())
                .unwrap_or(Value::Nil);
            (Value::from(*key), value)
        })
        .collect();
    Value::Map(entries)
}

fn strings(items: &[&str]) -> Value {
    Value::Array(items.iter().map(|item| Value::from(*item)).collect())
}

fn encode(value: &Value) -> Vec<u8> {
    let mut bytes = Vec::new();
    rmpv::encode::write_value(&mut bytes, value).expect("writing to a Vec cannot fail");
    bytes
}

/// An allocation dir with a task dir and an image in it.
struct Alloc {
    root: tempfile::TempDir,
    dirs: TaskDirs,
}

impl Alloc {
    fn new() -> Self {
        let root = tempfile::tempdir().expect("create temp dir");
        let alloc_dir = root.path().join("alloc-1");
        let task_dir = alloc_dir.join("web");
        fs::create_dir_all(task_dir.join("local")).expect("create task dir");
        fs::write(task_dir.join("local/linux.img"), b"image").expect("write image");
        Self {
            root,
            dirs: TaskDirs {
                alloc_dir,
                task_dir,
            },
        }
    }

    /// A dir outside the allocation, with a file in it.
    fn outside(&self) -> PathBuf {
        let dir = self.root.path().join("images");
        fs::create_dir_all(&dir).expect("create outside dir");
        fs::write(dir.join("shared.img"), b"image").expect("write image");
        dir
    }
}

fn config_with(set: &[(&str, Value)]) -> TaskConfig {
    let mut all = vec![("image_path", Value::from("local/linux.img"))];
    all.extend(set.iter().cloned());
    TaskConfig::from_value(&task_value(&all)).expect("valid task config")
}

fn rendered(command: &crate::driver::vm::argv::QemuCommandLine) -> Vec<String> {
    command
        .args()
        .into_iter()
        .map(|arg| arg.into_string().expect("UTF-8 argument"))
        .collect()
}

fn context(alloc: &Alloc) -> TaskContext {
    TaskContext {
        emulator: PathBuf::from("/usr/bin/qemu-system-x86_64"),
        task_dir: alloc.dirs.task_dir.clone(),
        memory_mib: 512,
        reserved_cores: Vec::new(),
        ports: Vec::new(),
        dns: None,
        network_isolated: false,
        host_memory_mib: Some(16 * 1024),
    }
}

// Decoding.

#[test]
fn decode_all_nil_gives_defaults() {
    let config = TaskConfig::from_value(&task_value(&[])).expect("decode");
    assert_eq!(config.image_path, "");
    assert_eq!(config.emulator, "x86_64");
    assert_eq!(config.machine_type, "pc");
    assert_eq!(config.drive_interface, "ide");
    assert_eq!(config.accelerator, "tcg");
    assert!(!config.graceful_shutdown);
    assert!(!config.guest_agent);
    assert!(config.args.is_empty());
    assert!(config.port_map.is_empty());
    assert_eq!(config.boot_timeout, Duration::from_secs(30));
    assert_eq!(config.memory_overhead_mib, 128);
}

#[test]
fn decode_every_option_from_bytes() {
    let value = task_value(&[
        ("image_path", Value::from("local/linux.img")),
        ("emulator", Value::from("qemu-system-aarch64")),
        ("machine_type", Value::from("q35")),
        ("drive_interface", Value::from("virtio")),
        ("accelerator", Value::from("kvm")),
        ("graceful_shutdown", Value::from(true)),
        ("guest_agent", Value::from(true)),
        ("args", strings(&["-nodefaults", "-snapshot"])),
        (
            "port_map",
            Value::Array(vec![Value::Map(vec![
                (Value::from("http"), Value::from(80)),
                (Value::from("ssh"), Value::from(22)),
            ])]),
        ),
        ("boot_timeout", Value::from("1m 30s")),
        ("memory_overhead", Value::from(256)),
    ]);
    let config = TaskConfig::decode(&encode(&value)).expect("decode");
    assert_eq!(config.image_path, "local/linux.img");
    assert_eq!(config.emulator, "qemu-system-aarch64");
    assert_eq!(config.machine_type, "q35");
    assert_eq!(config.drive_interface, "virtio");
    assert_eq!(config.accelerator, "kvm");
    assert!(config.graceful_shutdown);
    assert!(config.guest_agent);
    assert_eq!(config.args, ["-nodefaults", "-snapshot"]);
    assert_eq!(config.port_map.get("http"), Some(&80));
    assert_eq!(config.port_map.get("ssh"), Some(&22));
    assert_eq!(config.boot_timeout, Duration::from_secs(90));
    assert_eq!(config.memory_overhead_mib, 256);
}

#[test]
fn decode_numbers_in_every_form() {
    for number in [
        Value::from(300u64),
        Value::from(300i64),
        Value::F64(300.0),
        Value::from("300"),
    ] {
        let config = TaskConfig::from_value(&task_value(&[("memory_overhead", number.clone())]))
            .expect("decode");
        assert_eq!(config.memory_overhead_mib, 300, "from {number:?}");
    }
}

#[test]
fn decode_rejects_fraction_and_negative() {
    for number in [Value::F64(1.5), Value::from(-1), Value::from("0.1")] {
        let error = TaskConfig::from_value(&task_value(&[("memory_overhead", number.clone())]))
            .expect_err("must reject");
        assert!(
            matches!(&error, DecodeError::InvalidNumber { key, .. } if key == "memory_overhead"),
            "{number:?}: {error}"
        );
    }
}

#[test]
fn decode_port_map_merges_list_of_maps() {
    let port_map = Value::Array(vec![
        Value::Map(vec![(Value::from("ssh"), Value::from(22))]),
        Value::Map(vec![(Value::from("http"), Value::from("8080"))]),
    ]);
    let config = TaskConfig::from_value(&task_value(&[("port_map", port_map)])).expect("decode");
    assert_eq!(config.port_map.len(), 2);
    assert_eq!(config.port_map.get("ssh"), Some(&22));
    assert_eq!(config.port_map.get("http"), Some(&8080));
}

#[test]
fn decode_rejects_bad_port() {
    for port in [Value::from(0), Value::from(70000), Value::from(-1)] {
        let port_map = Value::Array(vec![Value::Map(vec![(Value::from("ssh"), port.clone())])]);
        let error =
            TaskConfig::from_value(&task_value(&[("port_map", port_map)])).expect_err("reject");
        assert!(
            error.to_string().contains("port_map.ssh"),
            "{port:?}: {error}"
        );
        assert!(
            error.to_string().contains("from 1 to 65535"),
            "{port:?}: {error}"
        );
    }
}

#[test]
fn decode_rejects_wrong_types() {
    let cases = [
        ("image_path", Value::from(5), "image_path must be a string"),
        (
            "guest_agent",
            Value::from("yes"),
            "guest_agent must be a bool",
        ),
        (
            "args",
            Value::from("-snapshot"),
            "args must be a list of strings",
        ),
        ("args", strings(&[]), ""),
    ];
    for (key, value, expected) in cases {
        let result = TaskConfig::from_value(&task_value(&[(key, value)]));
        if expected.is_empty() {
            assert!(result.is_ok(), "{key}: {result:?}");
        } else {
            let error = result.expect_err("must reject");
            assert!(error.to_string().contains(expected), "{key}: {error}");
        }
    }
}

#[test]
fn decode_rejects_nil_inside_args() {
    let args = Value::Array(vec![Value::from("-snapshot"), Value::Nil]);
    let error = TaskConfig::from_value(&task_value(&[("args", args)])).expect_err("reject");
    assert!(error.to_string().contains("args[1]"), "{error}");
}

#[test]
fn decode_rejects_bad_duration() {
    let error = TaskConfig::from_value(&task_value(&[("boot_timeout", Value::from("soon"))]))
        .expect_err("reject");
    assert!(error.to_string().contains("boot_timeout"), "{error}");
}

#[test]
fn decode_rejects_non_map_root() {
    let error = TaskConfig::decode(&encode(&Value::from(3))).expect_err("reject");
    assert!(matches!(error, DecodeError::NotAMap { .. }), "{error}");
}

#[test]
fn decode_rejects_truncated_bytes() {
    let bytes = encode(&task_value(&[("image_path", Value::from("a.img"))]));
    let error = TaskConfig::decode(&bytes[..bytes.len() - 2]).expect_err("reject");
    assert!(matches!(error, DecodeError::Msgpack { .. }), "{error}");
}

#[test]
fn decode_rejects_garbage_bytes() {
    let error = TaskConfig::decode(&[0xc1, 0xff, 0x00]).expect_err("reject");
    assert!(matches!(error, DecodeError::Garbage { .. }), "{error}");
    assert!(error.to_string().contains("0xc1"), "{error}");

    let mut bytes = encode(&task_value(&[("image_path", Value::from("a.img"))]));
    bytes.extend([0x00, 0x01]);
    let error = TaskConfig::decode(&bytes).expect_err("reject");
    assert!(error.to_string().contains("2 of its"), "{error}");
    let error = PluginConfig::decode(&[0xc0, 0xc0]).expect_err("reject");
    assert!(matches!(error, DecodeError::Garbage { .. }), "{error}");
}

#[test]
fn errors_cut_long_values() {
    let alloc = Alloc::new();
    let long = "x".repeat(100_000);
    let config = config_with(&[("image_path", Value::from(long.as_str()))]);
    let error = validate(config, &PluginConfig::default(), &alloc.dirs).expect_err("reject");
    let message = error.to_string();
    assert!(message.len() < 2_000, "{} bytes", message.len());
    assert!(message.contains("100002 characters, cut"), "{message}");
}

#[test]
fn plugin_decode_and_defaults() {
    assert_eq!(
        PluginConfig::decode(&[]).expect("decode"),
        PluginConfig::default()
    );

    let value = Value::Map(vec![
        (Value::from("args_allowlist"), strings(&["-device"])),
        (
            Value::from("emulators_allowlist"),
            strings(&["qemu-system-x86_64", "aarch64"]),
        ),
        (Value::from("image_paths"), strings(&["/srv/images"])),
    ]);
    let plugin = PluginConfig::decode(&encode(&value)).expect("decode");
    assert_eq!(plugin.args_allowlist, ["-device"]);
    assert_eq!(plugin.emulators_allowlist, ["x86_64", "aarch64"]);
    assert_eq!(plugin.image_paths, [PathBuf::from("/srv/images")]);
    plugin.validate().expect("valid plugin config");
}

#[test]
fn plugin_decode_all_nil() {
    let value = Value::Map(
        PLUGIN_OPTIONS
            .iter()
            .map(|key| (Value::from(*key), Value::Nil))
            .collect(),
    );
    assert_eq!(
        PluginConfig::from_value(&value).expect("decode"),
        PluginConfig::default()
    );
}

#[test]
fn plugin_rejects_relative_image_dir() {
    let plugin = PluginConfig {
        image_paths: vec![PathBuf::from("images")],
        ..PluginConfig::default()
    };
    let error = plugin.validate().expect_err("reject");
    assert!(
        matches!(error, ConfigError::RelativeImagePathsEntry { .. }),
        "{error}"
    );
}

#[test]
fn plugin_rejects_allowlist_non_flag() {
    let plugin = PluginConfig {
        args_allowlist: vec!["device".into()],
        ..PluginConfig::default()
    };
    let error = plugin.validate().expect_err("reject");
    assert!(error.to_string().contains("\"device\""), "{error}");
}

#[test]
fn plugin_rejects_bad_emulator_entry() {
    let plugin = PluginConfig {
        emulators_allowlist: vec!["../bin/sh".into()],
        ..PluginConfig::default()
    };
    let error = plugin.validate().expect_err("reject");
    assert!(matches!(error, ConfigError::InvalidName { .. }), "{error}");
}

// Validation.

#[test]
fn validate_resolves_relative_image() {
    let alloc = Alloc::new();
    let task = validate(config_with(&[]), &PluginConfig::default(), &alloc.dirs).expect("valid");
    let expected = alloc
        .dirs
        .task_dir
        .join("local/linux.img")
        .canonicalize()
        .expect("exists");
    assert_eq!(task.image, expected);
    assert_eq!(task.emulator_binary(), "qemu-system-x86_64");
}

#[test]
fn validate_rejects_missing_image_path() {
    let alloc = Alloc::new();
    let config = TaskConfig::from_value(&task_value(&[])).expect("decode");
    let error = validate(config, &PluginConfig::default(), &alloc.dirs).expect_err("reject");
    assert!(matches!(error, ConfigError::MissingImagePath), "{error}");
}

#[test]
fn validate_rejects_comma_in_image() {
    let alloc = Alloc::new();
    let config = config_with(&[("image_path", Value::from("local/linux.img,if=none"))]);
    let error = validate(config, &PluginConfig::default(), &alloc.dirs).expect_err("reject");
    assert!(
        matches!(error, ConfigError::CommaInImagePath { .. }),
        "{error}"
    );
}

#[test]
fn validate_rejects_absent_image() {
    let alloc = Alloc::new();
    let config = config_with(&[("image_path", Value::from("local/missing.img"))]);
    let error = validate(config, &PluginConfig::default(), &alloc.dirs).expect_err("reject");
    assert!(
        matches!(error, ConfigError::ImagePathNotFound { .. }),
        "{error}"
    );
}

#[test]
fn validate_rejects_image_outside() {
    let alloc = Alloc::new();
    let outside = alloc.outside().join("shared.img");
    let config = config_with(&[("image_path", Value::from(outside.to_str().expect("UTF-8")))]);
    let error = validate(config, &PluginConfig::default(), &alloc.dirs).expect_err("reject");
    assert!(
        matches!(error, ConfigError::ImagePathNotAllowed { .. }),
        "{error}"
    );
}

#[test]
fn validate_allows_image_in_image_paths() {
    let alloc = Alloc::new();
    let outside = alloc.outside();
    let config = config_with(&[(
        "image_path",
        Value::from(outside.join("shared.img").to_str().expect("UTF-8")),
    )]);
    let plugin = PluginConfig {
        image_paths: vec![outside.clone()],
        ..PluginConfig::default()
    };
    let task = validate(config, &plugin, &alloc.dirs).expect("valid");
    assert_eq!(
        task.image,
        outside.join("shared.img").canonicalize().expect("exists")
    );
}

#[test]
fn validate_rejects_symlink_escape() {
    let alloc = Alloc::new();
    let outside = alloc.outside().join("shared.img");
    symlink(&outside, alloc.dirs.task_dir.join("local/escape.img")).expect("symlink");
    let config = config_with(&[("image_path", Value::from("local/escape.img"))]);
    let error = validate(config, &PluginConfig::default(), &alloc.dirs).expect_err("reject");
    let ConfigError::ImagePathNotAllowed { resolved, .. } = &error else {
        panic!("wrong error: {error}");
    };
    assert_eq!(resolved, &outside.canonicalize().expect("exists"));
}

#[test]
fn validate_rejects_dotdot_escape() {
    let alloc = Alloc::new();
    alloc.outside();
    let config = config_with(&[("image_path", Value::from("../../images/shared.img"))]);
    let error = validate(config, &PluginConfig::default(), &alloc.dirs).expect_err("reject");
    assert!(
        matches!(error, ConfigError::ImagePathNotAllowed { .. }),
        "{error}"
    );
}

/// Runs `qemu-img` with `args`, failing with the install command when it is missing.
fn qemu_img(args: &[&str]) {
    let status = std::process::Command::new("qemu-img")
        .args(args)
        .status()
        .expect("run qemu-img (Debian: apt-get install qemu-utils)");
    assert!(status.success(), "qemu-img {args:?}: {status}");
}

#[test]
fn validate_rejects_non_file_image() {
    let alloc = Alloc::new();
    let local = alloc.dirs.task_dir.join("local");
    fs::create_dir(local.join("dir.img")).expect("create dir");
    let fifo = local.join("fifo.img");
    let status = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .expect("run mkfifo");
    assert!(status.success(), "mkfifo: {status}");
    let _socket =
        std::os::unix::net::UnixListener::bind(local.join("sock.img")).expect("bind socket");

    for (name, kind) in [
        ("local/dir.img", "a directory"),
        ("local/fifo.img", "a FIFO"),
        ("local/sock.img", "a socket"),
    ] {
        let config = config_with(&[("image_path", Value::from(name))]);
        let error = validate(config, &PluginConfig::default(), &alloc.dirs).expect_err("reject");
        assert!(
            matches!(&error, ConfigError::ImageNotAFile { kind: found, .. } if *found == kind),
            "{name}: {error}"
        );
        assert!(error.to_string().contains(name), "{error}");
    }
}

#[test]
fn validate_rejects_backing_outside() {
    let alloc = Alloc::new();
    let secret = alloc.outside().join("shared.img");
    let overlay = alloc.dirs.task_dir.join("local/overlay.qcow2");
    let secret_text = secret.to_str().expect("UTF-8");
    let overlay_text = overlay.to_str().expect("UTF-8");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-F",
        "raw",
        "-b",
        secret_text,
        overlay_text,
    ]);

    let config = config_with(&[("image_path", Value::from("local/overlay.qcow2"))]);
    let error = validate(config, &PluginConfig::default(), &alloc.dirs).expect_err("reject");
    let ConfigError::BackingFileNotAllowed { key, resolved, .. } = &error else {
        panic!("wrong error: {error}");
    };
    assert!(key.contains("backing-filename"), "{error}");
    assert_eq!(resolved, &secret.canonicalize().expect("exists"));

    // The same overlay passes once the backing file's dir is allowed.
    let plugin = PluginConfig {
        image_paths: vec![alloc.outside()],
        ..PluginConfig::default()
    };
    let config = config_with(&[("image_path", Value::from("local/overlay.qcow2"))]);
    validate(config, &plugin, &alloc.dirs).expect("backing file in image_paths");
}

#[test]
fn validate_rejects_relative_backing_escape() {
    let alloc = Alloc::new();
    alloc.outside();
    let local = alloc.dirs.task_dir.join("local");
    let base = local.join("base.raw");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "raw",
        base.to_str().expect("UTF-8"),
        "1M",
    ]);
    let overlay = local.join("overlay.qcow2");
    let overlay_text = overlay.to_str().expect("UTF-8");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-F",
        "raw",
        "-b",
        "base.raw",
        overlay_text,
    ]);
    let config = config_with(&[("image_path", Value::from("local/overlay.qcow2"))]);
    validate(config, &PluginConfig::default(), &alloc.dirs).expect("relative backing inside");

    qemu_img(&[
        "rebase",
        "-q",
        "-u",
        "-F",
        "raw",
        "-b",
        "../../../images/shared.img",
        overlay_text,
    ]);
    let config = config_with(&[("image_path", Value::from("local/overlay.qcow2"))]);
    let error = validate(config, &PluginConfig::default(), &alloc.dirs).expect_err("reject");
    assert!(
        matches!(error, ConfigError::BackingFileNotAllowed { .. }),
        "{error}"
    );
}

#[test]
fn validate_emulator_allowlist() {
    let alloc = Alloc::new();
    let plugin = PluginConfig {
        emulators_allowlist: vec!["x86_64".into()],
        ..PluginConfig::default()
    };
    let allowed = config_with(&[("emulator", Value::from("qemu-system-x86_64"))]);
    let task = validate(allowed, &plugin, &alloc.dirs).expect("valid");
    assert_eq!(task.config.emulator, "x86_64");

    let denied = config_with(&[("emulator", Value::from("aarch64"))]);
    let error = validate(denied, &plugin, &alloc.dirs).expect_err("reject");
    assert!(
        matches!(error, ConfigError::EmulatorNotAllowed { .. }),
        "{error}"
    );
}

#[test]
fn validate_rejects_injected_names() {
    let alloc = Alloc::new();
    for (key, value) in [
        ("emulator", "../../bin/sh"),
        ("machine_type", "pc,kernel=/etc/shadow"),
        ("accelerator", "tcg,thread=multi"),
    ] {
        let config = config_with(&[(key, Value::from(value))]);
        let error = validate(config, &PluginConfig::default(), &alloc.dirs).expect_err("reject");
        assert!(
            matches!(&error, ConfigError::InvalidName { option, .. } if *option == key),
            "{key}: {error}"
        );
    }
}

#[test]
fn validate_rejects_unknown_drive_interface() {
    let alloc = Alloc::new();
    let config = config_with(&[("drive_interface", Value::from("nvme"))]);
    let error = validate(config, &PluginConfig::default(), &alloc.dirs).expect_err("reject");
    assert!(error.to_string().contains("\"nvme\""), "{error}");
}

#[test]
fn validate_rejects_zero_boot_timeout() {
    let alloc = Alloc::new();
    let config = config_with(&[("boot_timeout", Value::from("0s"))]);
    let error = validate(config, &PluginConfig::default(), &alloc.dirs).expect_err("reject");
    assert!(matches!(error, ConfigError::ZeroBootTimeout), "{error}");
}

// The args allowlist rule.

fn check(
    alloc: &Alloc,
    plugin: &PluginConfig,
    args: &[&str],
) -> Result<ValidatedTask, ConfigError> {
    let config = config_with(&[("args", strings(args))]);
    validate(config, plugin, &alloc.dirs)
}

fn allowlist(flags: &[&str]) -> PluginConfig {
    PluginConfig {
        args_allowlist: flags.iter().map(|flag| flag.to_string()).collect(),
        ..PluginConfig::default()
    }
}

#[test]
fn args_unchecked_without_allowlist() {
    let alloc = Alloc::new();
    check(
        &alloc,
        &PluginConfig::default(),
        &["/etc/shadow", "-hdb", "/etc/passwd"],
    )
    .expect("built-in semantics: no allowlist, no check");
}

#[test]
fn args_allowed_flags_and_values() {
    let alloc = Alloc::new();
    let plugin = allowlist(&["-device", "-nodefaults", "-drive"]);
    check(
        &alloc,
        &plugin,
        &[
            "-nodefaults",
            "-device",
            "virtio-rng-pci,max-bytes=1024",
            "-drive",
            "file=local/linux.img,if=virtio",
        ],
    )
    .expect("valid");
}

#[test]
fn args_rejects_unlisted_flag() {
    let alloc = Alloc::new();
    let error = check(
        &alloc,
        &allowlist(&["-device"]),
        &["-device", "virtio-rng-pci", "-hdb"],
    )
    .expect_err("reject");
    assert!(
        matches!(&error, ConfigError::ArgNotAllowed { index: 2, arg, .. } if arg == "-hdb"),
        "{error}"
    );
}

#[test]
fn args_rejects_leading_positional() {
    let alloc = Alloc::new();
    let error = check(&alloc, &allowlist(&["-device"]), &["local/linux.img"]).expect_err("reject");
    assert!(
        matches!(error, ConfigError::PositionalArg { index: 0, .. }),
        "{error}"
    );
}

#[test]
fn args_rejects_second_value() {
    let alloc = Alloc::new();
    let error = check(
        &alloc,
        &allowlist(&["-device"]),
        &["-device", "virtio-rng-pci", "disk.img"],
    )
    .expect_err("reject");
    assert!(
        matches!(error, ConfigError::PositionalArg { index: 2, .. }),
        "{error}"
    );
}

#[test]
fn args_rejects_host_paths_in_values() {
    let alloc = Alloc::new();
    let plugin = allowlist(&["-nodefaults", "-drive", "-serial", "-blockdev"]);
    let cases: &[&[&str]] = &[
        &["-nodefaults", "/etc/shadow"],
        &["-drive", "file=/etc/shadow,if=virtio"],
        &["-drive", "file=local/x,,/../../../../etc/shadow"],
        &["-drive", "file=../../../etc/shadow"],
        &["-serial", "file:/etc/passwd"],
        &["-blockdev", r#"{"driver":"file","filename":"/etc/shadow"}"#],
        &["-drive", "file=local/new/../../../x"],
    ];
    for args in cases {
        let error = check(&alloc, &plugin, args).expect_err("reject");
        assert!(
            matches!(error, ConfigError::ArgPathNotAllowed { index: 1, .. }),
            "{args:?}: {error}"
        );
    }
}

#[test]
fn args_rejects_symlink_value() {
    let alloc = Alloc::new();
    let outside = alloc.outside().join("shared.img");
    symlink(&outside, alloc.dirs.task_dir.join("disk.img")).expect("symlink");
    let error = check(&alloc, &allowlist(&["-hdb"]), &["-hdb", "disk.img"]).expect_err("reject");
    let ConfigError::ArgPathNotAllowed { path, .. } = &error else {
        panic!("wrong error: {error}");
    };
    assert_eq!(path, &outside.canonicalize().expect("exists"));
}

#[test]
fn args_allows_paths_in_image_paths() {
    let alloc = Alloc::new();
    let outside = alloc.outside();
    let plugin = PluginConfig {
        image_paths: vec![outside.clone()],
        ..allowlist(&["-drive"])
    };
    let value = format!(
        "file={},if=virtio,readonly=on",
        outside.join("shared.img").display()
    );
    check(&alloc, &plugin, &["-drive", &value]).expect("valid");
}

#[test]
fn args_rejects_json_escaped_paths() {
    let alloc = Alloc::new();
    let plugin = allowlist(&["-device", "-drive", "-blockdev"]);
    let cases: &[&[&str]] = &[
        &[
            "-device",
            r#"{"driver":"loader","file":"\/etc\/shadow","addr":16777216}"#,
        ],
        &[
            "-device",
            r#"{"driver":"loader","file":"\u002fetc\u002fshadow"}"#,
        ],
        &[
            "-blockdev",
            r#"{"driver":"raw","file":{"driver":"file","filename":"\/etc\/x"}}"#,
        ],
        &[
            "-drive",
            r#"file=json:{"file.driver":"file",,"file.filename":"\/etc\/shadow"},if=virtio"#,
        ],
        &[
            "-drive",
            r#"file=json:{"file.filename":"\u002fetc\u002fshadow"}"#,
        ],
    ];
    for args in cases {
        let error = check(&alloc, &plugin, args).expect_err("reject");
        let ConfigError::ArgPathNotAllowed { index: 1, path, .. } = &error else {
            panic!("{args:?}: wrong error: {error}");
        };
        assert!(path.starts_with("/etc"), "{args:?}: {error}");
    }
}

#[test]
fn args_allows_json_inside() {
    let alloc = Alloc::new();
    let plugin = allowlist(&["-device", "-drive"]);
    check(
        &alloc,
        &plugin,
        &[
            "-device",
            r#"{"driver":"virtio-rng-pci","max-bytes":1024}"#,
            "-drive",
            r#"file=json:{"file.driver":"file",,"file.filename":"local\/linux.img"},if=virtio"#,
        ],
    )
    .expect("valid");
}

#[test]
fn args_rejects_broken_json() {
    let alloc = Alloc::new();
    let plugin = allowlist(&["-device", "-drive"]);
    let cases: &[&[&str]] = &[
        &["-device", r#"{"driver":"loader","file":"\/etc"#],
        &["-drive", r#"file=json:{"file.filename":"\/etc\/x""#],
    ];
    for args in cases {
        let error = check(&alloc, &plugin, args).expect_err("reject");
        assert!(
            matches!(error, ConfigError::ArgInvalidJson { index: 1, .. }),
            "{args:?}: {error}"
        );
    }
}

#[test]
fn args_denies_host_programs() {
    let alloc = Alloc::new();
    let plugin = allowlist(&[
        "-incoming",
        "-chardev",
        "-netdev",
        "-readconfig",
        "-L",
        "-plugin",
        "-device",
    ]);
    let cases: &[&[&str]] = &[
        &["-incoming", "exec:id>pwned;hostname>>pwned"],
        &["-chardev", "pipe,id=c0,path=x,exec:sh"],
        &["-netdev", "tap,id=n0,script=up.sh"],
        &["-netdev", "tap,id=n0,script=no,downscript=local/down.sh"],
        &["-netdev", "bridge,id=n0,br=br0,helper=local/helper"],
        &["-netdev", r#"{"type":"tap","id":"n0","script":"up.sh"}"#],
        &["-device", r#"{"driver":"x","id":"ex\u0065c:sh"}"#],
        &["-readconfig", "local/qemu.cfg"],
        &["--readconfig", "local/qemu.cfg"],
        &["-L", "local"],
        &["-plugin", "local/lib.so"],
    ];
    for args in cases {
        let error = check(&alloc, &plugin, args).expect_err("reject");
        assert!(
            matches!(error, ConfigError::ArgDenied { .. }),
            "{args:?}: {error}"
        );
    }
    check(
        &alloc,
        &plugin,
        &["-netdev", "tap,id=n0,ifname=tap0,script=no,downscript=no"],
    )
    .expect("tap without scripts");
}

// The command line.

#[test]
fn command_matches_builtin_defaults() {
    let alloc = Alloc::new();
    let task = validate(config_with(&[]), &PluginConfig::default(), &alloc.dirs).expect("valid");
    let command = build_command_line(&task, &context(&alloc)).expect("build");
    let image = task.image.to_str().expect("UTF-8");
    assert_eq!(
        command.emulator,
        PathBuf::from("/usr/bin/qemu-system-x86_64")
    );
    assert_eq!(
        rendered(&command),
        [
            "-machine",
            "type=pc,accel=tcg",
            "-name",
            "guest=linux.img",
            "-m",
            "512M",
            "-drive",
            &format!("file={image},if=ide,id=image0"),
            "-nographic",
        ]
    );
}

#[test]
fn command_full_featured() {
    let alloc = Alloc::new();
    let config = config_with(&[
        ("accelerator", Value::from("kvm")),
        ("machine_type", Value::from("q35")),
        ("guest_agent", Value::from(true)),
        ("args", strings(&["-snapshot"])),
        (
            "port_map",
            Value::Array(vec![Value::Map(vec![(
                Value::from("ssh"),
                Value::from(22),
            )])]),
        ),
    ]);
    let task = validate(config, &PluginConfig::default(), &alloc.dirs).expect("valid");
    let context = TaskContext {
        reserved_cores: vec![2, 3],
        ports: vec![
            TaskPort {
                label: "ssh".into(),
                value: 22000,
                to: None,
            },
            TaskPort {
                label: "http".into(),
                value: 28080,
                to: Some(8080),
            },
        ],
        dns: Some(DnsConfig {
            servers: vec!["10.0.0.53".into(), "10.0.0.54".into()],
            searches: vec!["svc.internal".into()],
        }),
        ..context(&alloc)
    };
    let args = rendered(&build_command_line(&task, &context).expect("build"));
    let agent_socket = alloc.dirs.task_dir.join("qa.sock");
    let tail: Vec<&str> = args[9..].iter().map(String::as_str).collect();
    assert_eq!(args[1], "type=q35,accel=kvm");
    assert_eq!(
        tail,
        [
            "-chardev",
            &format!("socket,path={},server=on,wait=off,id=qga0", agent_socket.display()),
            "-device",
            "virtio-serial",
            "-device",
            "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
            "-snapshot",
            "-netdev",
            "user,id=user.0,dns=10.0.0.53,dnssearch=svc.internal,hostfwd=udp::22000-:22,hostfwd=tcp::22000-:22",
            "-device",
            "virtio-net,netdev=user.0",
            "-cpu",
            "host",
            "-smp",
            "2",
        ]
    );
}

#[test]
fn command_forwards_to_port_when_isolated() {
    let alloc = Alloc::new();
    let config = config_with(&[(
        "port_map",
        Value::Array(vec![Value::Map(vec![(
            Value::from("http"),
            Value::from(80),
        )])]),
    )]);
    let task = validate(config, &PluginConfig::default(), &alloc.dirs).expect("valid");
    let context = TaskContext {
        ports: vec![TaskPort {
            label: "http".into(),
            value: 28080,
            to: Some(8080),
        }],
        network_isolated: true,
        ..context(&alloc)
    };
    let args = rendered(&build_command_line(&task, &context).expect("build"));
    assert!(
        args.contains(&"user,id=user.0,hostfwd=udp::8080-:80,hostfwd=tcp::8080-:80".to_owned()),
        "{args:?}"
    );
}

#[test]
fn command_no_smp_without_kvm() {
    let alloc = Alloc::new();
    let task = validate(config_with(&[]), &PluginConfig::default(), &alloc.dirs).expect("valid");
    let context = TaskContext {
        reserved_cores: vec![0, 1],
        ..context(&alloc)
    };
    let args = rendered(&build_command_line(&task, &context).expect("build"));
    assert!(!args.contains(&"-smp".to_owned()), "{args:?}");
    assert!(!args.contains(&"-cpu".to_owned()), "{args:?}");
}

#[test]
fn command_rejects_unknown_port_label() {
    let alloc = Alloc::new();
    let config = config_with(&[(
        "port_map",
        Value::Array(vec![Value::Map(vec![(
            Value::from("db"),
            Value::from(5432),
        )])]),
    )]);
    let task = validate(config, &PluginConfig::default(), &alloc.dirs).expect("valid");
    let context = TaskContext {
        ports: vec![TaskPort {
            label: "http".into(),
            value: 28080,
            to: None,
        }],
        ..context(&alloc)
    };
    let error = build_command_line(&task, &context).expect_err("reject");
    let message = error.to_string();
    assert!(message.contains("\"db\""), "{message}");
    assert!(message.contains("[\"http\"]"), "{message}");
}

#[test]
fn command_rejects_memory_out_of_range() {
    let alloc = Alloc::new();
    let task = validate(config_with(&[]), &PluginConfig::default(), &alloc.dirs).expect("valid");
    for memory_mib in [-1, 0, 15] {
        let context = TaskContext {
            memory_mib,
            ..context(&alloc)
        };
        let error = build_command_line(&task, &context).expect_err("reject");
        assert!(
            matches!(error, ConfigError::MemoryTooSmall { .. }),
            "{memory_mib}: {error}"
        );
    }

    let context = TaskContext {
        memory_mib: 16 * 1024,
        ..context(&alloc)
    };
    let error = build_command_line(&task, &context).expect_err("reject");
    assert!(
        matches!(error, ConfigError::MemoryTooLarge { .. }),
        "{error}"
    );
    assert_eq!(task.memory_limit_mib(512), 640);
}

#[test]
fn command_rejects_bad_dns_server() {
    let alloc = Alloc::new();
    let task = validate(config_with(&[]), &PluginConfig::default(), &alloc.dirs).expect("valid");
    let context = TaskContext {
        dns: Some(DnsConfig {
            servers: vec!["dns.example".into()],
            searches: Vec::new(),
        }),
        ..context(&alloc)
    };
    let error = build_command_line(&task, &context).expect_err("reject");
    assert!(
        matches!(error, ConfigError::InvalidDnsServer { .. }),
        "{error}"
    );
}

#[test]
fn command_rejects_long_agent_socket() {
    let alloc = Alloc::new();
    let long_dir = alloc.dirs.task_dir.join("x".repeat(100));
    fs::create_dir_all(&long_dir).expect("create dir");
    let config = config_with(&[("guest_agent", Value::from(true))]);
    let task = validate(config, &PluginConfig::default(), &alloc.dirs).expect("valid");
    let context = TaskContext {
        task_dir: long_dir,
        ..context(&alloc)
    };
    let error = build_command_line(&task, &context).expect_err("reject");
    assert!(
        matches!(error, ConfigError::SocketPathTooLong { .. }),
        "{error}"
    );
}

#[test]
fn uses_kvm_first_choice() {
    assert!(uses_kvm("kvm"));
    assert!(uses_kvm("kvm:tcg"));
    assert!(!uses_kvm("tcg"));
    assert!(!uses_kvm("tcg:kvm"));
}

#[test]
fn extra_args_stay_verbatim() {
    let alloc = Alloc::new();
    let config = config_with(&[(
        "args",
        strings(&["-device", "virtio-rng-pci,max-bytes=1024"]),
    )]);
    let task = validate(config, &PluginConfig::default(), &alloc.dirs).expect("valid");
    let args = build_command_line(&task, &context(&alloc))
        .expect("build")
        .args();
    let position = args
        .iter()
        .position(|arg| arg == &OsString::from("virtio-rng-pci,max-bytes=1024"));
    assert!(position.is_some(), "{args:?}");
}
