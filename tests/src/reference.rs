//! TPC-H answers computed straight from the CSV files with exact integer arithmetic,
//! independently of the pipeline's code (no polars, no Delta, no Flight).

use std::{collections::BTreeMap, path::Path};

use anyhow::Context;

/// A decimal string as an integer count of 10^-scale units ("21168.23", 2 -> 2116823).
pub fn fixed(text: &str, scale: u32) -> anyhow::Result<i128> {
    let (int, frac) = text.split_once('.').unwrap_or((text, ""));
    anyhow::ensure!(
        frac.len() as u32 <= scale,
        "{text} has more than {scale} decimals"
    );
    let negative = int.starts_with('-');
    let digits = format!(
        "{}{}{}",
        int.trim_start_matches('-'),
        frac,
        "0".repeat((scale - frac.len() as u32) as usize)
    );
    let value: i128 = digits
        .parse()
        .with_context(|| format!("not a decimal: {text}"))?;
    Ok(if negative { -value } else { value })
}

/// One row of TPC-H Q1; sums at scales 2 (qty, base price), 4 (disc price), 6 (charge).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PricingRow {
    pub sum_qty: i128,
    pub sum_base_price: i128,
    pub sum_disc_price: i128,
    pub sum_charge: i128,
    pub sum_disc: i128,
    pub count: i64,
}

/// One monthly revenue group: revenue at scale 4 and the distinct orders.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct MonthlyRow {
    pub revenue: i128,
    pub orders: std::collections::BTreeSet<i64>,
}

pub struct Reference {
    pub pricing: BTreeMap<(String, String), PricingRow>,
    pub monthly: BTreeMap<(String, String), MonthlyRow>,
    pub lineitems: usize,
}

fn csv_files(dir: &Path) -> anyhow::Result<Vec<std::path::PathBuf>> {
    let mut files: Vec<_> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "csv"))
        .collect();
    files.sort();
    Ok(files)
}

/// Computes both gold tables of examples/tpch.yaml from `<data>/{lineitem,orders}/*.csv`.
pub fn compute(data: &Path) -> anyhow::Result<Reference> {
    let mut orders: BTreeMap<i64, (String, String)> = BTreeMap::new();
    for file in csv_files(&data.join("orders"))? {
        let mut reader = csv::Reader::from_path(&file)?;
        for row in reader.records() {
            let row = row?;
            let key: i64 = row[0].parse()?;
            let month = row[4][..7].to_string();
            orders.insert(key, (month, row[5].to_string()));
        }
    }
    let mut pricing: BTreeMap<(String, String), PricingRow> = BTreeMap::new();
    let mut monthly: BTreeMap<(String, String), MonthlyRow> = BTreeMap::new();
    let mut lineitems = 0;
    for file in csv_files(&data.join("lineitem"))? {
        let mut reader = csv::Reader::from_path(&file)?;
        for row in reader.records() {
            let row = row?;
            lineitems += 1;
            let orderkey: i64 = row[0].parse()?;
            let qty = fixed(&row[4], 2)?;
            let price = fixed(&row[5], 2)?;
            let disc = fixed(&row[6], 2)?;
            let tax = fixed(&row[7], 2)?;
            let disc_price = price * (100 - disc); // scale 4
            if &row[10] <= "1998-09-02" {
                let g = pricing
                    .entry((row[8].to_string(), row[9].to_string()))
                    .or_default();
                g.sum_qty += qty;
                g.sum_base_price += price;
                g.sum_disc_price += disc_price;
                g.sum_charge += disc_price * (100 + tax); // scale 6
                g.sum_disc += disc;
                g.count += 1;
            }
            let (month, priority) = orders
                .get(&orderkey)
                .context("lineitem without order")?
                .clone();
            let m = monthly.entry((month, priority)).or_default();
            m.revenue += disc_price;
            m.orders.insert(orderkey);
        }
    }
    Ok(Reference {
        pricing,
        monthly,
        lineitems,
    })
}
