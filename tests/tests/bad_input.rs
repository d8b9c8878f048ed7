//! Bad input gets an error naming the file and line (or the spec field path), and nothing
//! is committed.

use medallion_lake::{Lake, Layer};
use medallion_tests::{Cluster, succeeded};

fn spec(source: &str) -> String {
    format!(
        "name: {source}\ndefaults: {{ retries: 0 }}\nsources:\n  - {{ name: {source}, format: csv, path: {source}/*.csv }}\n\
         silver:\n  - {{ name: {source}, from: bronze.{source} }}\n"
    )
}

async fn assert_rejected(cluster: &Cluster, source: &str, content: &[u8], expect: &[&str]) {
    let dir = cluster.data_dir().join(source);
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::fs::write(dir.join("input.csv"), content).expect("fixture");
    cluster.apply(&spec(source)).await.expect("apply");
    let (run, _) = cluster.run(source, false).await.expect("run");
    assert!(!succeeded(&run), "{source}: a bad file was accepted");
    assert!(
        run.error.contains("input.csv"),
        "{source}: error does not name the file: {}",
        run.error
    );
    for e in expect {
        assert!(
            run.error.contains(e),
            "{source}: error lacks `{e}`: {}",
            run.error
        );
    }
    let lake = Lake::open(
        &cluster.lake_dir().display().to_string(),
        Default::default(),
    )
    .expect("lake");
    assert!(
        lake.snapshot(Layer::Bronze, source, None)
            .await
            .expect("snapshot")
            .is_none(),
        "{source}: something was committed"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_files_name_file_and_line_and_commit_nothing() {
    let cluster = Cluster::start(None).await.expect("cluster");
    assert_rejected(
        &cluster,
        "unterminated",
        b"id,name\n1,\"ok\"\n2,\"broken\n3,fine\n",
        &["line 3", "unterminated"],
    )
    .await;
    assert_rejected(
        &cluster,
        "field_count",
        b"id,name\n1,a\n2,b,extra\n",
        &["line 3", "expected 2"],
    )
    .await;
    assert_rejected(
        &cluster,
        "bad_utf8",
        b"id,name\n1,a\n2,\xff\xfe\n",
        &["line 3", "UTF-8"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_specs_name_the_field_path() {
    let cluster = Cluster::start(None).await.expect("cluster");
    let base =
        "name: p\nsources:\n  - { name: raw, format: csv, path: raw.csv, columns: [id, amount] }\n";
    let cases = [
        (
            format!(
                "{base}silver:\n  - {{ name: a, from: silver.b }}\n  - {{ name: b, from: silver.a }}\n"
            ),
            "silver[0]",
            "cycle",
        ),
        (
            format!("{base}silver:\n  - {{ name: a, from: bronze.nope }}\n"),
            "silver[0].from",
            "unknown table `bronze.nope`",
        ),
        (
            format!(
                "{base}silver:\n  - name: a\n    from: bronze.raw\n    expectations:\n      - {{ name: e, expr: \"amont > 0\" }}\n"
            ),
            "silver[0].expectations[0].expr",
            "unknown column `amont`",
        ),
    ];
    for (yaml, path, message) in cases {
        let status = cluster
            .apply(&yaml)
            .await
            .expect_err("spec should be rejected");
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        assert!(
            status.message().starts_with(path),
            "`{}` should start with {path}",
            status.message()
        );
        assert!(
            status.message().contains(message),
            "`{}` should mention {message}",
            status.message()
        );
    }
}
