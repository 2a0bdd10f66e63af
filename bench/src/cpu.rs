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

/// The fields after the command name (which may hold spaces and parentheses).
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// CPU time (user + system) the process has used so far; zero once it is gone.
pub fn process_cpu(pid: u32) -> Duration {
    let Some(fields) = stat_fields(pid) else { return Duration::ZERO };
    // utime and stime are fields 14 and 15 of stat: 11 and 12 after the name.
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
    Duration::from_micros((ticks(11) + ticks(12)) * 1_000_000 / ticks_per_second())
}

/// CPU time used so far by this process's threads whose name starts with
/// `prefix` (thread names are cut to 15 bytes by the kernel).
pub fn own_threads_cpu(prefix: &str) -> Duration {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else { return Duration::ZERO };
    let mut total = Duration::ZERO;
    for task in tasks.flatten() {
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else { continue };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else { continue };
        if !stat[open + 1..close].starts_with(prefix) {
            continue;
        }
        let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
        total += Duration::from_micros((ticks(11) + ticks(12)) * 1_000_000 / ticks_per_second());
    }
    total
}

/// The process and its direct children (nginx's master and workers).
pub fn tree_cpu(pid: u32) -> Duration {
    let mut total = process_cpu(pid);
    let Ok(entries) = std::fs::read_dir("/proc") else { return total };
    for entry in entries.flatten() {
        let Some(child) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        // ppid is field 4 of stat: 1 after the name.
        let parent = stat_fields(child).and_then(|f| f.get(1).and_then(|p| p.parse::<u32>().ok()));
        if parent == Some(pid) {
            total += process_cpu(child);
        }
    }
    total
}

/// Whose CPU a phase charges.
#[derive(Debug, Clone, Copy)]
pub enum CpuSource {
    None,
    Process(u32),
    Tree(u32),
}

impl CpuSource {
    pub fn read(self) -> Option<Duration> {
        match self {
            CpuSource::None => None,
            CpuSource::Process(pid) => Some(process_cpu(pid)),
            CpuSource::Tree(pid) => Some(tree_cpu(pid)),
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
        assert!(own_threads_cpu("no-such-thread") == Duration::ZERO);
    }
}
