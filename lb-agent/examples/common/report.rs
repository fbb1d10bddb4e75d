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
