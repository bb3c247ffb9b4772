//! Repetitions and their summary: every case is timed `runs` times after
//! `warmup` untimed runs, and reported as the median with the min and max,
//! because one run on a shared 2-core machine says little.

use std::time::Duration;

/// The timed runs of one case: how much work each run did and how long it took.
#[derive(Debug, Clone)]
pub struct Series {
    pub name: String,
    /// Readings per run.
    pub readings: u64,
    /// Payload bytes per run, for MB/s.
    pub bytes: u64,
    pub times: Vec<Duration>,
}

impl Series {
    pub fn new(name: impl Into<String>, readings: u64, bytes: u64) -> Self {
        Self {
            name: name.into(),
            readings,
            bytes,
            times: Vec::new(),
        }
    }

    pub fn push(&mut self, took: Duration) {
        self.times.push(took);
    }

    /// Readings per second of each run, ascending.
    fn rates(&self) -> Vec<f64> {
        let mut r: Vec<f64> = self
            .times
            .iter()
            .map(|t| self.readings as f64 / t.as_secs_f64().max(1e-9))
            .collect();
        r.sort_by(f64::total_cmp);
        r
    }

    pub fn median_rate(&self) -> f64 {
        median(&self.rates())
    }

    pub fn min_rate(&self) -> f64 {
        self.rates().first().copied().unwrap_or(0.0)
    }

    pub fn max_rate(&self) -> f64 {
        self.rates().last().copied().unwrap_or(0.0)
    }

    /// Median MB/s (10^6 bytes) of the payload.
    pub fn median_mb_s(&self) -> f64 {
        if self.readings == 0 {
            return 0.0;
        }
        self.median_rate() * (self.bytes as f64 / self.readings as f64) / 1e6
    }
}

/// The median of sorted values; the mean of the middle two for an even count.
pub fn median(sorted: &[f64]) -> f64 {
    match sorted.len() {
        0 => 0.0,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

/// Formats a rate with thousands separators, so that tables read at a glance.
pub fn thousands(v: f64) -> String {
    let n = v.round() as u64;
    let s = n.to_string();
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Prints a markdown table of series, each with its ratio to the series it
/// is compared with (None for a baseline). A series without bytes has no MB/s.
pub fn print_table(title: &str, rows: &[(&Series, Option<&Series>)]) {
    println!("\n### {title}\n");
    println!("| case | readings/s (median) | min | max | MB/s (median) | ratio to baseline |");
    println!("|---|---:|---:|---:|---:|---|");
    // The table's own baseline goes unnamed in the ratio column; any other
    // series a row is compared with is named.
    let table_baseline = rows.iter().find(|(_, b)| b.is_none()).map(|(s, _)| *s);
    for (s, base) in rows {
        let ratio = match base {
            Some(b) if b.median_rate() > 0.0 => {
                let r = s.median_rate() / b.median_rate();
                if table_baseline.is_some_and(|t| std::ptr::eq(t, *b)) {
                    format!("{r:.2}")
                } else {
                    format!("{r:.2} of {}", b.name)
                }
            }
            Some(_) => "n/a".to_string(),
            None => "baseline".to_string(),
        };
        let mb_s = if s.bytes == 0 {
            "–".to_string()
        } else {
            format!("{:.1}", s.median_mb_s())
        };
        println!(
            "| {} | {} | {} | {} | {} | {} |",
            s.name,
            thousands(s.median_rate()),
            thousands(s.min_rate()),
            thousands(s.max_rate()),
            mb_s,
            ratio
        );
    }
}

/// Linux's USER_HZ, the unit of the CPU times in /proc.
const CLOCK_TICKS_PER_S: f64 = 100.0;

/// User plus system CPU seconds a process (all its threads) has used; `pid`
/// may be "self". Zero when /proc cannot tell, which shows up as a zero in
/// the tables rather than stopping a benchmark.
pub fn process_cpu_s(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which may hold spaces, closed by ')'.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the file, 12th and 13th here.
    let ticks: u64 = f
        .get(11..13)
        .map_or(0, |t| t.iter().filter_map(|v| v.parse::<u64>().ok()).sum());
    ticks as f64 / CLOCK_TICKS_PER_S
}

/// The machine's (busy, total) CPU seconds since boot, over all cores.
pub fn machine_cpu_s() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let total: u64 = ticks.iter().take(8).sum();
    // The fourth and fifth counters are idle and iowait.
    let idle = ticks.get(3).copied().unwrap_or(0) + ticks.get(4).copied().unwrap_or(0);
    (
        total.saturating_sub(idle) as f64 / CLOCK_TICKS_PER_S,
        total as f64 / CLOCK_TICKS_PER_S,
    )
}

/// CPU microseconds per reading of one case, one value per timed run.
#[derive(Debug, Clone, Default)]
pub struct CpuPerReading {
    pub name: String,
    pub own_us: Vec<f64>,
    pub broker_us: Vec<f64>,
}

impl CpuPerReading {
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            ..Self::default()
        }
    }

    /// Records one run: CPU seconds used by this process and the broker
    /// (None when its pid is unknown) for `readings`.
    pub fn push(&mut self, own_s: f64, broker_s: Option<f64>, readings: u64) {
        let per = |s: f64| s * 1e6 / readings.max(1) as f64;
        self.own_us.push(per(own_s));
        if let Some(b) = broker_s {
            self.broker_us.push(per(b));
        }
    }
}

/// Prints the CPU cost per reading of each case (medians over runs).
pub fn print_cpu_table(rows: &[&CpuPerReading]) {
    let med = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        median(&v)
    };
    println!("\n| case | CPU µs per reading, bench process (median) | CPU µs per reading, broker (median) |");
    println!("|---|---:|---:|");
    for r in rows {
        let broker = if r.broker_us.is_empty() {
            "–".to_string()
        } else {
            format!("{:.2}", med(&r.broker_us))
        };
        println!("| {} | {:.2} | {} |", r.name, med(&r.own_us), broker);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[1.0, 2.0, 9.0]), 2.0);
        assert_eq!(median(&[1.0, 2.0, 4.0, 9.0]), 3.0);
        assert_eq!(median(&[]), 0.0);
    }

    #[test]
    fn rates_use_readings_over_time() {
        let mut s = Series::new("x", 1000, 64_000);
        s.push(Duration::from_millis(500));
        s.push(Duration::from_millis(250));
        s.push(Duration::from_millis(1000));
        assert_eq!(s.median_rate(), 2000.0);
        assert_eq!(s.min_rate(), 1000.0);
        assert_eq!(s.max_rate(), 4000.0);
        assert!((s.median_mb_s() - 0.128).abs() < 1e-9);
    }

    #[test]
    fn thousands_separators() {
        assert_eq!(thousands(0.0), "0");
        assert_eq!(thousands(999.4), "999");
        assert_eq!(thousands(1234567.0), "1,234,567");
    }
}
