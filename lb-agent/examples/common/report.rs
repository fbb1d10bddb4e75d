//! Writing benchmark results into BENCHMARKS.md, shared by the benchmark programs.

use std::path::Path;

/// Replaces (or appends) the section between `<!-- NAME:begin -->` and `<!-- NAME:end -->`.
pub fn write_section(path: &Path, name: &str, body: &str) -> anyhow::Result<()> {
    let (begin, end) = (format!("<!-- {name}:begin -->"), format!("<!-- {name}:end -->"));
    let section = format!("{begin}\n{body}\n{end}\n");
    let old = std::fs::read_to_string(path).unwrap_or_else(|_| "# Benchmarks\n\n".into());
    let new = match (old.find(&begin), old.find(&end)) {
        (Some(b), Some(e)) => {
            format!("{}{}{}", &old[..b], section, old[e + end.len()..].trim_start_matches('\n'))
        }
        _ => format!("{}\n\n{}", old.trim_end(), section),
    };
    std::fs::write(path, new)?;
    Ok(())
}

/// The machine a figure was measured on: CPU model, cores, kernel.
#[allow(dead_code)] // (the traffic benchmarks name theirs in their notes)
pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let kernel = std::process::Command::new("uname")
        .arg("-r")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{cpu}, {cores} cores, kernel {kernel}")
}

/// Today's date (UTC, `YYYY-MM-DD`), for a section's header.
pub fn today() -> String {
    std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}
