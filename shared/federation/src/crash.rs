//! Crash points for the process-level fault tests: places where a test can make the process die as a SIGKILL
//! there would (mid-save, mid-upload), deterministically. They exist only in builds with the `failpoints` feature
//! (the server's test builds turn it on); elsewhere they compile to nothing.

/// A crash point. Armed by `FAILPOINTS="NAME=return"` (tikv's fail-rs syntax), the process aborts here; with
/// `return(MS)` it first sleeps MS milliseconds (so bytes already handed to the network leave); `N*off->return`
/// lets the first N passes through.
pub fn crash_point(name: &str) {
    let _ = name; // unused where the points compile to nothing
    fail::fail_point!(name, |ms: Option<String>| {
        if let Some(ms) = ms.and_then(|m| m.parse::<u64>().ok()) {
            std::thread::sleep(std::time::Duration::from_millis(ms));
        }
        tracing::warn!(point = name, "crash point reached: aborting");
        std::process::abort()
    });
}

/// Arms the crash points the `FAILPOINTS` environment variable names (a binary calls this first); a no-op in
/// builds without the `failpoints` feature, whatever the environment says.
pub fn arm_crash_points() {
    #[cfg(feature = "failpoints")]
    std::mem::forget(fail::FailScenario::setup());
}
