//! CPU time of processes, from `/proc/<pid>/stat` (utime + stime).

use std::sync::OnceLock;
use std::time::Duration;

/// Clock ticks per second of `/proc` times (`getconf CLK_TCK`, almost always 100).
fn ticks_per_second() -> u64 {
    static TICKS: OnceLock<u64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|out| String::from_utf8(out.stdout).ok())
            .and_then(|text| text.trim().parse().ok())
            .filter(|ticks| *ticks > 0)
            .unwrap_or(100)
    })
}

/// The command name and the fields after it, from a `stat` file's text
/// (the name may hold spaces and parentheses).
fn parse_stat(stat: &str) -> Option<(&str, Vec<&str>)> {
    let (head, rest) = stat.rsplit_once(')')?;
    let (_, name) = head.split_once('(')?;
    Some((name, rest.split_whitespace().collect()))
}

/// utime + stime from the fields after the name (stat's fields 14 and 15).
fn cpu_of(fields: &[&str]) -> Duration {
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
    Duration::from_micros((ticks(11) + ticks(12)) * 1_000_000 / ticks_per_second())
}

fn read_stat(pid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()
}

/// CPU time (user + system) the process has used so far; zero once it is gone.
pub fn process_cpu(pid: u32) -> Duration {
    let stat = read_stat(pid).unwrap_or_default();
    parse_stat(&stat).map_or(Duration::ZERO, |(_, fields)| cpu_of(&fields))
}

/// The threads that make settles durable, by the names the kernel keeps (cut
/// to 15 bytes): the gateway's store writer, sled's IO threads, the
/// historian and its checkpoint writer, and the meter floor's writer.
pub const STORE_THREADS: [&str; 5] = ["ledger-writer", "sled-io", "historian", "checkpoint", "floor-writer"];

/// CPU time used so far by this process's threads whose name starts with
/// `prefix`.
pub fn own_threads_cpu(prefix: &str) -> Duration {
    threads_cpu("/proc/self/task", &[prefix])
}

/// CPU time used so far by the threads under `tasks` (a `/proc/…/task`
/// directory) whose name starts with one of `prefixes`. A thread that has
/// ended is no longer listed: these are meant for long-lived threads.
fn threads_cpu(tasks: &str, prefixes: &[&str]) -> Duration {
    let Ok(tasks) = std::fs::read_dir(tasks) else { return Duration::ZERO };
    let mut total = Duration::ZERO;
    for task in tasks.flatten() {
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else { continue };
        match parse_stat(&stat) {
            Some((name, fields)) if prefixes.iter().any(|prefix| name.starts_with(prefix)) => {
                total += cpu_of(&fields)
            }
            _ => {}
        }
    }
    total
}

/// The process and its direct children (nginx's master and workers).
pub fn tree_cpu(pid: u32) -> Duration {
    process_cpu(pid) + children(pid).into_iter().map(process_cpu).sum::<Duration>()
}

/// The direct children of `pid`.
fn children(pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()))
        .filter(|child| {
            // ppid is field 4 of stat: 1 after the name.
            let stat = read_stat(*child).unwrap_or_default();
            parse_stat(&stat).and_then(|(_, fields)| fields.get(1)?.parse::<u32>().ok()) == Some(pid)
        })
        .collect()
}

/// Resident memory of the process now (`VmRSS`), in KiB; 0 once it is gone.
pub fn process_rss_kb(pid: u32) -> u64 {
    status_kb(pid, "VmRSS:")
}

/// The anonymous part of it (`RssAnon`: heap, stacks), in KiB. The rest is
/// mostly the executable's code and read-only data mapped from its file,
/// which grows with the binary, not with what the process holds.
pub fn process_rss_anon_kb(pid: u32) -> u64 {
    status_kb(pid, "RssAnon:")
}

/// A `kB` line of `/proc/PID/status`; 0 once the process is gone.
fn status_kb(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status.lines().find_map(|line| line.strip_prefix(field))?.split_whitespace().next()?.parse().ok()
        })
        .unwrap_or(0)
}

/// Whose CPU a phase charges.
#[derive(Debug, Clone)]
pub enum CpuSource {
    None,
    Process(u32),
    Tree(u32),
    /// Several processes together (a cluster's replicas).
    Processes(std::sync::Arc<[u32]>),
}

impl CpuSource {
    pub fn read(&self) -> Option<Duration> {
        match self {
            CpuSource::None => None,
            CpuSource::Process(pid) => Some(process_cpu(*pid)),
            CpuSource::Tree(pid) => Some(tree_cpu(*pid)),
            CpuSource::Processes(pids) => Some(pids.iter().map(|pid| process_cpu(*pid)).sum()),
        }
    }

    /// CPU time of the same processes' [`STORE_THREADS`] so far.
    pub fn read_store_threads(&self) -> Option<Duration> {
        let of = |pid: &u32| threads_cpu(&format!("/proc/{pid}/task"), &STORE_THREADS);
        match self {
            CpuSource::None => None,
            CpuSource::Process(pid) | CpuSource::Tree(pid) => Some(of(pid)),
            CpuSource::Processes(pids) => Some(pids.iter().map(of).sum()),
        }
    }

    /// Resident memory of the same processes now, in KiB.
    pub fn rss_kb(&self) -> Option<u64> {
        self.sum(process_rss_kb)
    }

    /// Their anonymous resident memory now, in KiB.
    pub fn rss_anon_kb(&self) -> Option<u64> {
        self.sum(process_rss_anon_kb)
    }

    fn sum(&self, read: fn(u32) -> u64) -> Option<u64> {
        match self {
            CpuSource::None => None,
            CpuSource::Process(pid) => Some(read(*pid)),
            CpuSource::Tree(pid) => Some(read(*pid) + children(*pid).into_iter().map(read).sum::<u64>()),
            CpuSource::Processes(pids) => Some(pids.iter().map(|pid| read(*pid)).sum()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_used_some_cpu() {
        let spin = std::time::Instant::now();
        while spin.elapsed() < Duration::from_millis(30) {
            std::hint::black_box(spin.elapsed());
        }
        assert!(process_cpu(std::process::id()) > Duration::ZERO, "utime+stime read from /proc");
        let (rss, anon) = (process_rss_kb(std::process::id()), process_rss_anon_kb(std::process::id()));
        assert!(rss > 0, "VmRSS read from /proc");
        assert!(anon > 0 && anon < rss, "RssAnon read from /proc, a part of VmRSS: {anon} of {rss} KiB");
    }

    #[test]
    fn a_named_thread_is_charged_its_own_cpu() {
        let before = own_threads_cpu("cpu-test-spin");
        let spinner = std::thread::Builder::new()
            .name("cpu-test-spin".into())
            .spawn(|| {
                let spin = std::time::Instant::now();
                while own_threads_cpu("cpu-test-spin") < Duration::from_millis(30) {
                    std::hint::black_box(spin.elapsed());
                }
                own_threads_cpu("cpu-test-spin")
            })
            .unwrap();
        let during = spinner.join().unwrap();
        assert_eq!(before, Duration::ZERO, "no such thread before");
        assert!(during >= Duration::from_millis(30), "the spinning thread saw its own time: {during:?}");
        assert_eq!(own_threads_cpu("no-such-thread"), Duration::ZERO);
    }

    #[test]
    fn a_store_thread_of_a_process_is_counted_apart() {
        let me = CpuSource::Process(std::process::id());
        assert_eq!(me.read_store_threads(), Some(Duration::ZERO), "no store thread yet");
        let writer = std::thread::Builder::new()
            .name("ledger-writer".into())
            .spawn(move || {
                let spin = std::time::Instant::now();
                while own_threads_cpu("ledger-writer") < Duration::from_millis(30) {
                    std::hint::black_box(spin.elapsed());
                }
                CpuSource::Process(std::process::id()).read_store_threads()
            })
            .unwrap();
        let seen = writer.join().unwrap().unwrap();
        assert!(seen >= Duration::from_millis(30), "the store thread's CPU: {seen:?}");
    }
}
