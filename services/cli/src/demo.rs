//! `medallion demo`: TPC-H data generated with tpchgen, a local stack, examples/tpch.yaml
//! run end to end, and the gold tables printed.

use std::{
    fmt::Write as _,
    io::Write,
    path::{Path, PathBuf},
};

use anyhow::Context;
use medallion_proto::v1 as pb;

use crate::{display, stack};

/// The example pipeline, built in so the demo needs nothing but the binaries.
pub const TPCH_SPEC: &str = include_str!("../../../examples/tpch.yaml");

#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// TPC-H scale factor (1 = 6M lineitem rows).
    #[arg(long, default_value_t = 0.1)]
    pub scale_factor: f64,
    /// Lake root folder (default: <work>/lake).
    #[arg(long)]
    pub lake: Option<PathBuf>,
    /// Work folder for generated data, lake and state.
    #[arg(long, default_value = "./.medallion/demo")]
    pub work: PathBuf,
    /// Also load the gold tables into this PostgreSQL database.
    #[arg(long, env = "MEDALLION_WAREHOUSE_URL")]
    pub warehouse: Option<String>,
    /// First of the four ports the demo's services use.
    #[arg(long, default_value_t = 50070)]
    pub base_port: u16,
}

/// Writes TPC-H `lineitem` and `orders` as CSV with headers under `<dir>/data/{lineitem,orders}/`,
/// in `parts` files each; skipped when the same scale factor was generated there before.
pub fn generate_tpch(dir: &Path, scale_factor: f64, parts: i32) -> anyhow::Result<()> {
    let data = dir.join("data");
    let marker = data.join(".generated");
    let wanted = format!("sf={scale_factor} parts={parts}");
    if std::fs::read_to_string(&marker).ok().as_deref() == Some(wanted.as_str()) {
        return Ok(());
    }
    for table in ["lineitem", "orders"] {
        let folder = data.join(table);
        if folder.exists() {
            std::fs::remove_dir_all(&folder)
                .with_context(|| format!("cannot clear {}", folder.display()))?;
        }
        std::fs::create_dir_all(&folder)
            .with_context(|| format!("cannot create {}", folder.display()))?;
    }
    for part in 1..=parts {
        let path = data.join("lineitem").join(format!("part-{part}.csv"));
        let mut out = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(&path)?);
        writeln!(out, "{}", tpchgen::csv::LineItemCsv::header())?;
        let mut line = String::new();
        for item in tpchgen::generators::LineItemGenerator::new(scale_factor, part, parts).iter() {
            line.clear();
            writeln!(line, "{}", tpchgen::csv::LineItemCsv::new(item))?;
            out.write_all(line.as_bytes())?;
        }
        out.flush()?;
        let path = data.join("orders").join(format!("part-{part}.csv"));
        let mut out = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(&path)?);
        writeln!(out, "{}", tpchgen::csv::OrderCsv::header())?;
        for order in tpchgen::generators::OrderGenerator::new(scale_factor, part, parts).iter() {
            line.clear();
            writeln!(line, "{}", tpchgen::csv::OrderCsv::new(order))?;
            out.write_all(line.as_bytes())?;
        }
        out.flush()?;
    }
    std::fs::write(&marker, wanted)?;
    Ok(())
}

pub async fn demo(args: DemoArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.work)
        .with_context(|| format!("cannot create {}", args.work.display()))?;
    let work = std::fs::canonicalize(&args.work)?;
    println!(
        "generating TPC-H at scale factor {} in {}",
        args.scale_factor,
        work.join("data").display()
    );
    let (dir, sf) = (work.clone(), args.scale_factor);
    tokio::task::spawn_blocking(move || generate_tpch(&dir, sf, 1)).await??;
    let stack_args = stack::StackArgs {
        lake: args
            .lake
            .clone()
            .unwrap_or_else(|| work.join("lake"))
            .display()
            .to_string(),
        state_dir: work.join("state"),
        base_port: args.base_port,
        warehouse: args.warehouse.clone(),
    };
    println!(
        "starting the services (logs in {})",
        work.join("state/logs").display()
    );
    let stack = stack::Stack::start(&stack_args).await?;
    let result = run_demo(&stack, &work).await;
    stack.stop().await;
    result?;
    if let Some(w) = &args.warehouse {
        println!(
            "gold tables loaded into {} (schema medallion_tpch)",
            redact(w)
        );
    }
    Ok(())
}

/// A URL without its password, for printing.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            let user = creds.split(':').next().unwrap_or_default();
            format!("{}{}@{}", &url[..s + 3], user, &url[at + 1..])
        }
        _ => url.to_string(),
    }
}

async fn run_demo(stack: &stack::Stack, work: &Path) -> anyhow::Result<()> {
    let mut client = crate::connect(&stack.coordinator, &crate::Access::default()).await?;
    let pipeline = crate::apply_text(
        &mut client,
        TPCH_SPEC.to_string(),
        work.display().to_string(),
    )
    .await?;
    println!(
        "applied pipeline {} ({} tables)",
        pipeline.name,
        pipeline.tables.len()
    );
    let run = client
        .trigger_run(pb::TriggerRunRequest {
            pipeline: pipeline.name.clone(),
            full_refresh: false,
            tables: vec![],
        })
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?
        .into_inner();
    println!("run {} started", run.id);
    display::watch(&mut client, &run.id).await?;
    for table in ["gold.pricing_summary", "gold.monthly_revenue"] {
        println!();
        display::print_table(&stack.aggregator, &Default::default(), table, None, 30).await?;
    }
    Ok(())
}
