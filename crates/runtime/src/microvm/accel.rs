//! Choosing QEMU's accelerator: KVM only when the host has hardware
//! virtualization (the `kvm_intel` or `kvm_amd` module is loaded) and
//! `/dev/kvm` opens read-write; TCG otherwise. A `/dev/kvm` without those
//! modules (e.g. a PVM host) cannot boot an ordinary guest, so it does not
//! count. The probe only looks at files: it never starts a VM, so it cannot
//! hang.

use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }

    /// QEMU arguments selecting the accelerator and a matching CPU model.
    pub fn qemu_args(self) -> Vec<String> {
        match self {
            Accel::Kvm => vec!["-accel".into(), "kvm".into(), "-cpu".into(), "host".into()],
            Accel::Tcg => vec![
                "-accel".into(),
                "tcg,thread=multi".into(),
                "-cpu".into(),
                "max".into(),
            ],
        }
    }
}

/// What the host offers, from `sys_module` (normally `/sys/module`) and the
/// KVM device node.
pub fn detect(sys_module: &Path, dev_kvm: &Path) -> Accel {
    let hw = ["kvm_intel", "kvm_amd"]
        .iter()
        .any(|m| sys_module.join(m).exists());
    let usable = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(dev_kvm)
        .is_ok();
    if hw && usable {
        Accel::Kvm
    } else {
        Accel::Tcg
    }
}

/// Resolve the configured choice (`auto`, `kvm`, `tcg`).
pub fn choose(setting: &str) -> Result<Accel, String> {
    match setting {
        "kvm" => Ok(Accel::Kvm),
        "tcg" => Ok(Accel::Tcg),
        "auto" => Ok(detect(Path::new("/sys/module"), Path::new("/dev/kvm"))),
        other => Err(format!("accel: '{other}' is not one of auto, kvm, tcg")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kvm_needs_the_hardware_module_and_the_device() {
        let d = std::env::temp_dir().join(format!("sf-accel-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(d.join("mods")).unwrap();
        let dev = d.join("kvm");
        std::fs::write(&dev, "").unwrap();
        // A device but no hardware module (a PVM host): TCG.
        assert_eq!(detect(&d.join("mods"), &dev), Accel::Tcg);
        std::fs::create_dir_all(d.join("mods/kvm_amd")).unwrap();
        assert_eq!(detect(&d.join("mods"), &dev), Accel::Kvm);
        // The module but no device: TCG.
        assert_eq!(detect(&d.join("mods"), &d.join("missing")), Accel::Tcg);
        assert_eq!(choose("tcg"), Ok(Accel::Tcg));
        assert!(choose("xen").is_err());
        std::fs::remove_dir_all(d).unwrap();
    }
}
