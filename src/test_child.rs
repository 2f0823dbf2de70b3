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
    run_output_with_env(name, conf, &[], None)
}

/// As `run`, with more variables in the child's environment, and a deadline: a child still
/// running after `limit` is killed and the test fails (for tests of hangs).
pub fn run_with_env(
    name: &str,
    conf: Option<&str>,
    env: &[(&str, &str)],
    limit: std::time::Duration,
) -> String {
    run_output_with_env(name, conf, env, Some(limit)).0
}

fn run_output_with_env(
    name: &str,
    conf: Option<&str>,
    env: &[(&str, &str)],
    limit: Option<std::time::Duration>,
) -> (String, String) {
    use std::io::Read;
    use std::process::Stdio;
    let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
    cmd.args(["--exact", name, "--nocapture", "--test-threads=1"])
        .env(CHILD, "1")
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    match conf {
        Some(c) => cmd.env("HBMALLOC_CONF", c),
        None => cmd.env_remove("HBMALLOC_CONF"),
    };
    let mut child = cmd.spawn().unwrap();
    // Read both pipes as the child writes, so that a full pipe never stalls it.
    let drain = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut text = Vec::new();
            let _ = pipe.read_to_end(&mut text);
            String::from_utf8_lossy(&text).into_owned()
        })
    };
    let stdout = drain(Box::new(child.stdout.take().unwrap()));
    let stderr = drain(Box::new(child.stderr.take().unwrap()));
    let deadline = limit.map(|l| std::time::Instant::now() + l);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if deadline.is_some_and(|d| std::time::Instant::now() > d) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{name}: still running after {limit:?}, killed");
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    };
    let (stdout, stderr) = (stdout.join().unwrap(), stderr.join().unwrap());
    assert!(status.success(), "{stdout}{stderr}");
    (stdout, stderr)
}
