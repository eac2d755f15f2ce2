//! Peak resident memory of this process, on each platform the edge runs on.

/// Highest resident memory of this process so far, in bytes: Linux `VmHWM`, macOS `getrusage`'s `ru_maxrss`,
/// Windows' peak working set; `None` where the platform says nothing.
pub fn peak_rss_bytes() -> Option<u64> {
    peak()
}

#[cfg(target_os = "linux")]
fn peak() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[cfg(target_os = "macos")]
fn peak() -> Option<u64> {
    // SAFETY: getrusage writes one plain struct that we own; zeroed is a valid value of it.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        (libc::getrusage(libc::RUSAGE_SELF, &mut usage) == 0).then_some(usage)?
    };
    // Bytes on macOS (kilobytes on Linux and the BSDs).
    u64::try_from(usage.ru_maxrss).ok()
}

#[cfg(windows)]
fn peak() -> Option<u64> {
    use windows_sys::Win32::System::ProcessStatus::{GetProcessMemoryInfo, PROCESS_MEMORY_COUNTERS};
    use windows_sys::Win32::System::Threading::GetCurrentProcess;
    let size = std::mem::size_of::<PROCESS_MEMORY_COUNTERS>() as u32;
    // SAFETY: the counters are a plain struct we own, its size passed alongside; the pseudo-handle of the current
    // process needs no closing.
    let counters = unsafe {
        let mut counters: PROCESS_MEMORY_COUNTERS = std::mem::zeroed();
        counters.cb = size;
        (GetProcessMemoryInfo(GetCurrentProcess(), &mut counters, size) != 0).then_some(counters)?
    };
    Some(counters.PeakWorkingSetSize as u64)
}

#[cfg(not(any(target_os = "linux", target_os = "macos", windows)))]
fn peak() -> Option<u64> {
    None
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_peak_covers_memory_this_test_touched() {
        let block = vec![1u8; 64 << 20];
        std::hint::black_box(&block);
        let peak = super::peak_rss_bytes().expect("reported on this platform");
        assert!(peak >= 64 << 20, "peak {peak} below the 64 MiB just touched");
    }
}
