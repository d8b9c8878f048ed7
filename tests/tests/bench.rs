//! `medallion bench tpch` at a small scale: both paths run for every run, each run's figures,
//! the per-layer summary and every process's peak memory and CPU seconds are printed, and a
//! warm-up run is left out of them. The figures themselves are not judged here (timed numbers
//! belong to the benchmark, not to a test).

use std::net::TcpListener;

/// A base port with it and the next three free (the bench's services take four in a row).
fn four_free_ports() -> u16 {
    for _ in 0..100 {
        let base = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        if base > u16::MAX - 3 {
            continue;
        }
        if (1..4).all(|i| TcpListener::bind(("127.0.0.1", base + i)).is_ok()) {
            return base;
        }
    }
    panic!("no four consecutive free ports on 127.0.0.1");
}

/// The number in `text` after `label` and any spaces (e.g. "services" in "services 1.23 s").
fn number_after(text: &str, label: &str) -> f64 {
    let rest = text[text
        .find(label)
        .unwrap_or_else(|| panic!("no {label:?} in {text:?}"))
        + label.len()..]
        .trim_start();
    let end = rest
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(rest.len());
    rest[..end]
        .parse()
        .unwrap_or_else(|_| panic!("no number after {label:?} in {text:?}"))
}

/// The line of `text` that starts (after indentation) with `label`.
fn row_of<'a>(text: &'a str, label: &str) -> &'a str {
    text.lines()
        .find(|l| l.trim_start().starts_with(label))
        .unwrap_or_else(|| panic!("no {label:?} row in:\n{text}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn bench_tpch_runs_both_paths_and_prints_their_figures() {
    let work = tempfile::tempdir().expect("work folder");
    let output = tokio::process::Command::new(medallion_tests::bin_dir().join("medallion"))
        .args([
            "bench",
            "tpch",
            "--scale-factor",
            "0.01",
            "--runs",
            "2",
            "--warmup",
            "1",
        ])
        .arg("--work")
        .arg(work.path())
        .args(["--base-port", &four_free_ports().to_string()])
        .output()
        .await
        .expect("run medallion bench");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "bench failed: {}\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );

    // The warm-up runs both paths before the first measured run, and is not counted as one.
    let warmup = stdout
        .find("warm-up 1 of 1: services ")
        .unwrap_or_else(|| panic!("no warm-up line in:\n{stdout}"));
    let first_run = stdout
        .find("\nrun 1:")
        .unwrap_or_else(|| panic!("no first run in:\n{stdout}"));
    assert!(
        warmup < first_run,
        "the warm-up came after a measured run:\n{stdout}"
    );
    let warmup_line = stdout[warmup..].lines().next().unwrap_or_default();
    assert!(
        number_after(warmup_line, "services ") > 0.0,
        "{warmup_line}"
    );
    assert!(
        number_after(warmup_line, "one process ") > 0.0,
        "{warmup_line}"
    );
    assert!(
        !stdout.contains("\nrun 3:"),
        "the warm-up was counted as a run:\n{stdout}"
    );

    for run in ["run 1:", "run 2:"] {
        let line = stdout
            .lines()
            .find(|l| l.starts_with(run))
            .unwrap_or_else(|| panic!("no {run:?} line in:\n{stdout}"));
        let (services, one_process) = line.split_once("one process").expect("both paths");
        // A layer of the one-process path can take under 5 ms at this scale (0.00 printed).
        for text in [services, one_process] {
            for label in ["bronze ", "silver ", "gold "] {
                assert!(number_after(text, label) >= 0.0, "{label:?}: {line}");
            }
        }
        assert!(number_after(services, ": services ") > 0.0, "{line}");
        assert!(number_after(one_process, " ") > 0.0, "{line}");
        assert!(number_after(line, "ratio ") > 0.0, "{line}");
    }

    let summary = stdout
        .split("medians of 2 runs of each path")
        .nth(1)
        .unwrap_or_else(|| panic!("no summary of medians in:\n{stdout}"));
    for layer in ["bronze", "silver", "gold", "total"] {
        let row = row_of(summary, layer);
        let figures: Vec<f64> = row
            .split_whitespace()
            .skip(1)
            .map(|f| f.parse().expect("a number"))
            .collect();
        assert_eq!(figures.len(), 3, "{row}");
        if layer == "total" {
            assert!(figures.iter().all(|f| *f > 0.0), "{row}");
        }
    }
    let (memory, cpu) = summary
        .split_once("CPU seconds")
        .unwrap_or_else(|| panic!("no CPU seconds in:\n{summary}"));
    for process in [
        "medallion-ingestor",
        "medallion-refiner",
        "medallion-aggregator",
        "services total",
        "one process",
    ] {
        let line = row_of(memory, process);
        assert!(number_after(line, process) >= 0.01, "{line}");
        // Every process parsed CSV, refined or aggregated: it used CPU time, split into user
        // and system seconds. Over two runs a median is the mean, so the parts add up to the
        // total (to the rounding of the printed figures).
        let line = row_of(cpu, process);
        let figures: Vec<f64> = line
            .split_whitespace()
            .filter_map(|f| f.parse().ok())
            .collect();
        let busy = ["services total", "one process"].contains(&process);
        assert_eq!(figures.len(), if busy { 4 } else { 3 }, "{line}");
        let (user, system, total) = (figures[0], figures[1], figures[2]);
        assert!(user >= 0.0 && system >= 0.0 && total > 0.0, "{line}");
        assert!((user + system - total).abs() <= 0.02, "{line}");
        // The totals also give the cores each path kept busy on average.
        if busy {
            assert!(figures[3] > 0.0, "{line}");
        }
    }
}
