//! What a process costs, read from `/proc/self`, and the number conversions
//! the figures need.

use std::fs;

/// Clock ticks per second of `/proc/self/stat` (`USER_HZ`, 100 on Linux).
const TICKS_PER_SECOND: f64 = 100.0;

/// CPU time this process has used so far (user + system, every thread), in
/// seconds.
///
/// The sum over `/proc/self/task/*/schedstat` is exact to the nanosecond but
/// forgets threads that have exited; `/proc/self/stat` counts those too but
/// only in 10 ms ticks. The first is used unless the second is more than two
/// ticks larger (then a thread that exited did real work). Returns 0 where
/// `/proc` cannot be read.
pub(crate) fn cpu_seconds() -> f64 {
    let coarse = ticks_cpu_seconds();
    match threads_cpu_seconds() {
        Some(exact) if coarse <= exact + 2.0 / TICKS_PER_SECOND => exact,
        _ => coarse,
    }
}

/// The sum of the on-CPU time of the live threads, from `schedstat`.
fn threads_cpu_seconds() -> Option<f64> {
    let mut nanos: u64 = 0;
    for task in fs::read_dir("/proc/self/task").ok()? {
        let schedstat = fs::read_to_string(task.ok()?.path().join("schedstat")).ok()?;
        nanos += schedstat.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(to_f64(nanos) / 1e9)
}

/// utime + stime from `/proc/self/stat`, in seconds.
fn ticks_cpu_seconds() -> f64 {
    let Ok(stat) = fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    // The command name (field 2) is in parentheses and may hold spaces; the
    // fields after the last `)` start with field 3, so utime (14) and stime
    // (15) are the 12th and 13th.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0.0;
    };
    let ticks: u64 = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|field| field.parse::<u64>().ok())
        .sum();
    to_f64(ticks) / TICKS_PER_SECOND
}

/// The peak resident set size of this process (`VmHWM`), in kB; 0 where
/// `/proc` cannot be read.
pub(crate) fn peak_rss_kb() -> u64 {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("VmHWM:"))
                .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// The machine: number of CPUs and the CPU model.
pub(crate) fn machine() -> (usize, String) {
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    let model = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|line| line.starts_with("model name"))
                .and_then(|line| line.split_once(':'))
                .map(|(_, model)| model.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".to_owned());
    (cpus, model)
}

/// The median of `values` (the upper one of an even count); `None` when empty.
pub(crate) fn median(values: impl IntoIterator<Item = f64>) -> Option<f64> {
    let mut values: Vec<f64> = values.into_iter().collect();
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied()
}

/// A count as a float, for rates and ratios (exact below 2^53).
#[allow(clippy::cast_precision_loss)]
pub(crate) fn to_f64(n: impl Into<u64>) -> f64 {
    n.into() as f64
}

/// A non-negative float rank as an index; negative and NaN become 0.
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
pub(crate) fn to_index(rank: f64) -> usize {
    if rank.is_nan() || rank <= 0.0 {
        0
    } else {
        rank as usize
    }
}
