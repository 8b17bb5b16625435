//! `boards/`: every profile parses with the typed schema (unknown keys refused), names a
//! target the cross builds make, and has an example config in `config/` that loads and uses
//! exactly the serial devices the profile lists, in RS-485 mode where the profile says so.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Profile {
    /// The file stem.
    id: String,
    board: String,
    /// Debian architecture of the package to install.
    arch: String,
    rust_target: String,
    os: String,
    /// `config/board-{id}.toml`.
    example_config: String,
    notes: Vec<String>,
    serial: Vec<SerialDevice>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SerialDevice {
    /// A device path, or `/dev/serial/by-id/usb-*` for USB adapters.
    path: String,
    kind: Kind,
    description: String,
    default_baud: u32,
}

#[derive(Debug, Deserialize, PartialEq, Eq, Clone, Copy)]
#[serde(rename_all = "snake_case")]
enum Kind {
    /// A UART on the board's header.
    Uart,
    /// A USB adapter, by its stable by-id name.
    Usb,
    /// A UART wired to an on-board RS-485 transceiver through RTS: needs kernel RS-485 mode.
    Rs485,
}

const USB_PATTERN: &str = "/dev/serial/by-id/usb-*";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn profiles() -> Vec<(PathBuf, Profile)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(root().join("boards")).expect("boards/ exists") {
        let path = entry.expect("entry").path();
        if path.extension().and_then(|e| e.to_str()) != Some("toml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("read profile");
        let profile: Profile = toml::from_str(&text)
            .unwrap_or_else(|e| panic!("{} does not parse: {e}", path.display()));
        out.push((path, profile));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

#[test]
fn every_supported_board_has_a_profile() {
    let ids: BTreeSet<String> = profiles().into_iter().map(|(_, p)| p.id).collect();
    for board in [
        "rpi4",
        "rpi5",
        "cm4",
        "cm4-industrial-rs485",
        "beaglebone-black",
    ] {
        assert!(
            ids.contains(board),
            "boards/{board}.toml is missing: {ids:?}"
        );
    }
}

#[test]
fn profiles_name_a_cross_built_target_and_sensible_devices() {
    let cross = std::fs::read_to_string(root().join("cross/build")).expect("cross/build");
    for (path, p) in profiles() {
        let at = path.display();
        assert_eq!(
            path.file_stem().and_then(|s| s.to_str()),
            Some(p.id.as_str()),
            "{at}"
        );
        assert!(!p.board.is_empty() && !p.os.is_empty(), "{at}");
        let arch = match p.rust_target.as_str() {
            "aarch64-unknown-linux-gnu" => "arm64",
            "armv7-unknown-linux-gnueabihf" => "armhf",
            other => panic!("{at}: {other} is not a target the packages are built for"),
        };
        assert_eq!(
            p.arch, arch,
            "{at}: the .deb architecture of {}",
            p.rust_target
        );
        assert!(
            cross.contains(&p.rust_target),
            "{at}: cross/build does not build it"
        );
        assert!(
            p.notes.iter().any(|n| n.contains("dialout")),
            "{at}: say who may open the ports (the dialout group)"
        );
        assert!(!p.serial.is_empty(), "{at}: no serial devices");
        for d in &p.serial {
            assert!(!d.description.is_empty(), "{at}: {}", d.path);
            assert!(
                sahool_gateway::config::serial::STANDARD_BAUDS.contains(&d.default_baud),
                "{at}: {} baud",
                d.default_baud
            );
            match d.kind {
                Kind::Usb => assert_eq!(d.path, USB_PATTERN, "{at}: USB adapters go by-id"),
                Kind::Uart | Kind::Rs485 => assert!(
                    d.path.starts_with("/dev/tty") && !d.path.contains('*'),
                    "{at}: {}",
                    d.path
                ),
            }
            if d.kind == Kind::Rs485 {
                assert!(
                    p.notes.iter().any(|n| n.contains("rs485")),
                    "{at}: an RS-485 port needs a note on kernel RS-485 mode"
                );
            }
        }
    }
}

#[test]
fn each_profile_has_an_example_config_that_uses_its_devices() {
    let mut examples = BTreeSet::new();
    for (path, p) in profiles() {
        let at = path.display();
        assert_eq!(
            p.example_config,
            format!("config/board-{}.toml", p.id),
            "{at}"
        );
        let config_path = root().join(&p.example_config);
        let config = sahool_gateway::config::load(&config_path)
            .unwrap_or_else(|e| panic!("{at}: example config: {e}"));
        assert!(
            !config.serial.is_empty(),
            "{at}: the example has no [[serial]] port"
        );
        for port in &config.serial {
            let device = profile_device(&p, &port.path).unwrap_or_else(|| {
                panic!(
                    "{}: port {} at {} is not a device of {at}",
                    p.example_config,
                    port.name,
                    port.path.display()
                )
            });
            assert_eq!(
                port.rs485.is_some(),
                device.kind == Kind::Rs485,
                "{}: port {}: kernel RS-485 mode exactly on the board's RS-485 UART",
                p.example_config,
                port.name
            );
        }
        examples.insert(config_path);
    }
    // And no example without its profile.
    for entry in std::fs::read_dir(root().join("config")).expect("config/") {
        let path = entry.expect("entry").path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if name.starts_with("board-") {
            assert!(examples.contains(&path), "{name} has no profile in boards/");
        }
    }
}

fn profile_device<'a>(p: &'a Profile, path: &Path) -> Option<&'a SerialDevice> {
    let path = path.to_str()?;
    p.serial.iter().find(|d| match d.kind {
        Kind::Usb => path
            .strip_prefix(USB_PATTERN.trim_end_matches('*'))
            .is_some_and(|name| !name.is_empty() && !name.contains('/')),
        Kind::Uart | Kind::Rs485 => d.path == path,
    })
}
