//! Examples of this crate run as processes by tests.

use std::path::{Path, PathBuf};

/// `target/<profile>/examples/<name>`, next to the test binary's
/// `target/<profile>/deps/`. `cargo test` builds it; when the test was built
/// alone (`--test …`), or after the test binary, it is (re)built with the same
/// cargo, profile and target directory.
pub(crate) fn example_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("the test binary lives in target/<profile>/deps");
    let binary = profile_dir
        .join("examples")
        .join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    if !is_newer(&binary, &exe) {
        build_example(profile_dir, name);
    }
    assert!(
        binary.is_file(),
        "no {} after building the example",
        binary.display()
    );
    binary
}

/// Whether `path` exists and is at least as new as `than`.
fn is_newer(path: &Path, than: &Path) -> bool {
    let modified = |path: &Path| std::fs::metadata(path).and_then(|meta| meta.modified());
    match (modified(path), modified(than)) {
        (Ok(path), Ok(than)) => path >= than,
        _ => false,
    }
}

/// Variables cargo sets for a test process about its package.
const PACKAGE_VARS: &[&str] = &[
    "CARGO_MANIFEST_DIR",
    "CARGO_MANIFEST_PATH",
    "CARGO_CRATE_NAME",
    "CARGO_BIN_NAME",
    "CARGO_PRIMARY_PACKAGE",
    "CARGO_TARGET_TMPDIR",
    "CARGO_RUSTC_CURRENT_DIR",
    "OUT_DIR",
];

fn build_example(profile_dir: &Path, name: &str) {
    let target_dir = profile_dir
        .parent()
        .expect("target/<profile> has a target directory");
    let mut cargo = std::process::Command::new(env!("CARGO"));
    // What cargo set for this test process describes this package, not the
    // build; build scripts that watch such variables (ring watches
    // CARGO_MANIFEST_DIR) would otherwise rebuild for nothing.
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        if name.starts_with("CARGO_PKG_") || PACKAGE_VARS.contains(&&*name) {
            cargo.env_remove(&*name);
        }
    }
    cargo
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["build", "--quiet", "--example", name, "--target-dir"])
        .arg(target_dir);
    match profile_dir.file_name().and_then(|name| name.to_str()) {
        Some("debug") | None => {}
        Some("release") => {
            cargo.arg("--release");
        }
        Some(profile) => {
            cargo.args(["--profile", profile]);
        }
    }
    let status = cargo.status().expect("run cargo build");
    assert!(status.success(), "`{cargo:?}` failed: {status}");
}
