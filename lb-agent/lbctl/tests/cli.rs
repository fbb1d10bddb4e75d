//! lbctl's errors say what to do: nothing pinned, another layout, not root.

use std::process::Command;

const LBCTL: &str = env!("CARGO_BIN_EXE_lbctl");

fn lbctl(pin_dir: &std::path::Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(LBCTL).arg("--pin-dir").arg(pin_dir).args(args).output().expect("run lbctl");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn lbctl_errors_are_clear() {
    let dir = std::path::PathBuf::from(format!("/sys/fs/bpf/lbctl-test-{}", std::process::id()));
    let (ok, _, err) = lbctl(&dir, &["services"]);
    assert!(!ok && err.contains("nothing pinned at") && err.contains("--pin-dir"), "{err}");
    std::fs::create_dir_all(dir.join("v1")).expect("old layout");
    let (ok, _, err) = lbctl(&dir, &["services"]);
    assert!(!ok && err.contains("holds pinned layout [\"v1\"]"), "{err}");
    // Not root: the pins are root's only.
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", LBCTL, "--pin-dir"])
        .arg(&dir)
        .arg("services")
        .output()
        .expect("setpriv (util-linux)");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("permission denied") && err.contains("run as root"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
