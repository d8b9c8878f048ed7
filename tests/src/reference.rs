//! TPC-H answers computed straight from the CSV files with exact integer arithmetic,
//! independently of the pipeline's code (no polars, no Delta, no Flight).

use std::{collections::BTreeMap, path::Path};

use anyhow::Context;

use crate::{Cluster, values};

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

/// Checks both gold tables of examples/tpch.yaml against the reference computed from `data`.
pub async fn assert_gold_matches(cluster: &Cluster, data: &Path) {
    let expected = compute(data).expect("reference");
    let pricing = cluster
        .read("gold.pricing_summary")
        .await
        .expect("read pricing_summary");
    let mut seen = 0;
    for b in &pricing {
        for row in 0..b.num_rows() {
            let key = (
                values::string(b, "l_returnflag", row).expect("flag"),
                values::string(b, "l_linestatus", row).expect("status"),
            );
            let want = expected
                .pricing
                .get(&key)
                .unwrap_or_else(|| panic!("unexpected group {key:?}"));
            assert_eq!(
                values::decimal(b, "sum_qty", row, 2),
                want.sum_qty,
                "{key:?} sum_qty"
            );
            assert_eq!(
                values::decimal(b, "sum_base_price", row, 2),
                want.sum_base_price,
                "{key:?} sum_base_price"
            );
            assert_eq!(
                values::decimal(b, "sum_disc_price", row, 4),
                want.sum_disc_price,
                "{key:?} sum_disc_price"
            );
            assert_eq!(
                values::decimal(b, "sum_charge", row, 6),
                want.sum_charge,
                "{key:?} sum_charge"
            );
            assert_eq!(
                values::int(b, "count_order", row),
                want.count,
                "{key:?} count_order"
            );
            let n = want.count as f64;
            let cents = |x: f64| (x * 100.0).round();
            assert_eq!(
                cents(values::float(b, "avg_qty", row)),
                cents(want.sum_qty as f64 / 100.0 / n),
                "{key:?} avg_qty"
            );
            assert_eq!(
                cents(values::float(b, "avg_price", row)),
                cents(want.sum_base_price as f64 / 100.0 / n),
                "{key:?} avg_price"
            );
            assert_eq!(
                cents(values::float(b, "avg_disc", row)),
                cents(want.sum_disc as f64 / 100.0 / n),
                "{key:?} avg_disc"
            );
            seen += 1;
        }
    }
    assert_eq!(seen, expected.pricing.len(), "pricing_summary groups");

    let monthly = cluster
        .read("gold.monthly_revenue")
        .await
        .expect("read monthly_revenue");
    let mut seen = 0;
    for b in &monthly {
        for row in 0..b.num_rows() {
            let key = (
                values::string(b, "order_month", row).expect("month"),
                values::string(b, "o_orderpriority", row).expect("priority"),
            );
            let want = expected
                .monthly
                .get(&key)
                .unwrap_or_else(|| panic!("unexpected group {key:?}"));
            assert_eq!(
                values::decimal(b, "revenue", row, 4),
                want.revenue,
                "{key:?} revenue"
            );
            assert_eq!(
                values::int(b, "order_count", row),
                want.orders.len() as i64,
                "{key:?} order_count"
            );
            seen += 1;
        }
    }
    assert_eq!(seen, expected.monthly.len(), "monthly_revenue groups");
}

/// The warehouse (PostgreSQL, or PostgreSQL behind the local Redshift Data API endpoint) holds
/// exactly the gold rows; drops `schema` afterwards.
pub async fn assert_warehouse_matches(cluster: &Cluster, schema: &str) {
    let (client, connection) =
        tokio_postgres::connect(&crate::postgres_url(), tokio_postgres::NoTls)
            .await
            .expect("connect to PostgreSQL");
    tokio::spawn(connection);
    let gold = cluster
        .read("gold.pricing_summary")
        .await
        .expect("read gold");
    let rows = client
        .query(
            &format!(
                "SELECT l_returnflag, l_linestatus, sum_qty::text, sum_disc_price::text, sum_charge::text, count_order \
                 FROM \"{schema}\".pricing_summary ORDER BY 1, 2"
            ),
            &[],
        )
        .await
        .expect("query warehouse");
    assert_eq!(
        rows.len(),
        values::rows(&gold),
        "warehouse pricing_summary rows"
    );
    let mut i = 0;
    for b in &gold {
        for row in 0..b.num_rows() {
            let r = &rows[i];
            assert_eq!(
                r.get::<_, String>(0),
                values::string(b, "l_returnflag", row).expect("flag")
            );
            assert_eq!(
                r.get::<_, String>(1),
                values::string(b, "l_linestatus", row).expect("status")
            );
            assert_eq!(
                fixed(&r.get::<_, String>(2), 2).expect("qty"),
                values::decimal(b, "sum_qty", row, 2)
            );
            assert_eq!(
                fixed(&r.get::<_, String>(3), 4).expect("disc"),
                values::decimal(b, "sum_disc_price", row, 4)
            );
            assert_eq!(
                fixed(&r.get::<_, String>(4), 6).expect("charge"),
                values::decimal(b, "sum_charge", row, 6)
            );
            assert_eq!(r.get::<_, i64>(5), values::int(b, "count_order", row));
            i += 1;
        }
    }
    let gold_monthly = values::rows(
        &cluster
            .read("gold.monthly_revenue")
            .await
            .expect("read gold"),
    );
    let count: i64 = client
        .query_one(
            &format!("SELECT count(*) FROM \"{schema}\".monthly_revenue"),
            &[],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(
        count as usize, gold_monthly,
        "warehouse monthly_revenue rows"
    );
    client
        .batch_execute(&format!("DROP SCHEMA \"{schema}\" CASCADE"))
        .await
        .expect("drop test schema");
}
