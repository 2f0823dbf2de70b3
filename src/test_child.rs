//! For unit tests that change process-wide state (the configuration, the runtime's backends,
//! sticky errors, the global tracker's counts): run one test of this test binary alone in a child
//! process, and have the test itself do its work only when it is that child.

/// Set in the child's environment.
const CHILD: &str = "HBM_TEST_CHILD";

/// Whether this process is a child started by `run`.
pub fn is_child() -> bool {
    std::env::var_os(CHILD).is_some()
}

/// Runs the test `name` (its full path, `module::tests::name`) alone in a child process with
/// `HBMALLOC_CONF` set to `conf` (unset when `None`); asserts that it succeeded; returns its stdout.
pub fn run(name: &str, conf: Option<&str>) -> String {
    run_output(name, conf).0
}

/// As `run`, returning the child's stdout and stderr.
pub fn run_output(name: &str, conf: Option<&str>) -> (String, String) {
    run_output_with_env(name, conf, &[])
}

/// As `run`, with more variables in the child's environment.
pub fn run_with_env(name: &str, conf: Option<&str>, env: &[(&str, &str)]) -> String {
    run_output_with_env(name, conf, env).0
}

fn run_output_with_env(name: &str, conf: Option<&str>, env: &[(&str, &str)]) -> (String, String) {
    let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
    cmd.args(["--exact", name, "--nocapture", "--test-threads=1"])
        .env(CHILD, "1")
        .envs(env.iter().copied());
    match conf {
        Some(c) => cmd.env("HBMALLOC_CONF", c),
        None => cmd.env_remove("HBMALLOC_CONF"),
    };
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{stdout}{stderr}");
    (stdout, stderr)
}
