//! What would break is caught before the daemon runs (`kbsync config check` against the
//! database, the daemon's own start-up checks), and a source that breaks while it runs
//! (a column renamed under it) is shown broken — `kbsync status`, `/readyz`,
//! `kbsync_source_broken` — with what to fix, tried again slowly, never in a loop, and
//! synced again once fixed.

#![allow(clippy::unwrap_used)] // a failed setup step in a test should panic right there

use std::time::{Duration, Instant};

use kbsync_testkit::demo_state::converged;
use kbsync_testkit::{DaemonProcess, Installed, wait_for_daemon};

const DIMS: usize = 8;
const WAIT: Duration = Duration::from_secs(60);

/// `kbsync config check ARGS` with `config`, against `t`'s database, with the key the
/// test provider's config names (the check builds the provider as the daemon does).
fn config_check(
    t: &Installed,
    config: &kbsync_testkit::TempConfig,
    args: &[&str],
) -> kbsync_testkit::CommandOutput {
    let mut all = vec!["config", "check"];
    all.extend_from_slice(args);
    kbsync_testkit::run_kbsync(
        config.path(),
        &all,
        &[
            ("DATABASE_URL", t.db.url()),
            ("OPENAI_API_KEY", kbsync_testkit::TEST_API_KEY),
        ],
    )
}

#[tokio::test]
async fn a_column_typo_is_refused_by_config_check_and_by_the_daemon_at_start() {
    let t = Installed::new(DIMS, "100ms", "100ms").await;
    let typo = t.config.edited(&[("{answer}", "{answre}")]);
    let out = config_check(&t, &typo, &[]);
    out.assert_failure();
    assert!(
        out.stderr.contains("sources.faq") && out.stderr.contains("column t.answre does not exist"),
        "{}",
        out.stderr
    );
    // Without a database the file alone passes, and says what it could not check.
    let offline = kbsync_testkit::run_kbsync(
        typo.path(),
        &["config", "check", "--quiet"],
        &[("OPENAI_API_KEY", kbsync_testkit::TEST_API_KEY)],
    );
    offline.assert_success();
    assert_eq!(offline.stdout.lines().count(), 1, "{}", offline.stdout);
    assert!(
        offline.stdout.contains("NOT CHECKED against the database"),
        "{}",
        offline.stdout
    );
    // The good config, against the database: one line.
    let good = config_check(&t, &t.config, &["--quiet"]);
    good.assert_success();
    assert_eq!(good.stdout.lines().count(), 1, "{}", good.stdout);
    assert!(
        good.stdout.contains(
            "every table and column the sources use exists; the installed capture is this config's"
        ),
        "{}",
        good.stdout
    );

    let mut daemon = t.daemon_with(&typo);
    let status = daemon.exit_within(WAIT).await;
    assert!(!status.success());
    let log = daemon.log();
    assert!(
        log.contains("sources.faq") && log.contains("answre\" does not exist"),
        "{log}"
    );
}

#[tokio::test]
async fn a_daemon_whose_config_is_not_the_installed_capture_refuses_to_start() {
    let t = Installed::new(DIMS, "100ms", "100ms").await;
    // Another filter for pages: the capture triggers test the filter.
    let changed = t.config.edited(&[(
        "column = \"crawl_status\", equals = \"completed\"",
        "column = \"crawl_status\", equals = \"done\"",
    )]);
    let check = config_check(&t, &changed, &["--quiet"]);
    check.assert_success();
    assert!(
        check
            .stdout
            .contains("the installed capture is NOT this config's"),
        "{}",
        check.stdout
    );
    let mut daemon = t.daemon_with(&changed);
    let status = daemon.exit_within(WAIT).await;
    assert!(!status.success());
    let log = daemon.log();
    assert!(
        log.contains("the capture installed in this database is not this config's")
            && log.contains("Run `kbsync install` with this config"),
        "{log}"
    );
    t.db.kbsync_with_config(changed.path(), &["install"])
        .assert_success();
    let daemon = t.daemon_with(&changed);
    daemon.wait_until_listening(1, WAIT).await;
}

/// The value of the series `name` with `labels` in a Prometheus text.
fn sample(metrics: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let scrape =
        prometheus_parse::Scrape::parse(metrics.lines().map(|l| Ok(l.to_owned()))).unwrap();
    scrape
        .samples
        .iter()
        .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match &s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => *v,
            other => panic!("{name} is not a number: {other:?}"),
        })
}

#[tokio::test]
async fn a_column_renamed_under_a_running_source_marks_it_broken_without_a_loop() {
    let t = Installed::new(DIMS, "100ms", "100ms").await;
    let config = t.config.edited(&[(
        "drain_timeout = \"20s\"",
        "drain_timeout = \"20s\"\nbroken_source_retry = \"2s\"",
    )]);
    t.seed();
    let daemon = t.daemon_with(&config);
    converged(&t.client, &daemon).await;

    // An application migration renames a column the FAQ text uses, in the transaction
    // of an edit that was captured.
    t.client
        .batch_execute(
            "BEGIN;
             UPDATE web_knowledge_qapair SET answer = answer || ' (updated)'
              WHERE id = (SELECT id FROM web_knowledge_qapair WHERE generation_status = 'completed' ORDER BY id LIMIT 1);
             ALTER TABLE web_knowledge_qapair RENAME COLUMN answer TO answer_text;
             COMMIT;",
        )
        .await
        .unwrap();

    let status = wait_for_daemon(&daemon, WAIT, "faq shown broken", || async {
        let out = t.db.kbsync_with_config(config.path(), &["status"]);
        out.stdout
            .lines()
            .find(|l| l.starts_with("attention: faq: BROKEN"))
            .map(str::to_owned)
    })
    .await;
    assert!(
        status.contains("column t.answer does not exist"),
        "{status}"
    );
    assert!(status.contains("correct the config"), "{status}");
    let broken_at = Instant::now();

    let (code, body) = daemon.http_get("/readyz").await;
    assert_eq!(code, 503, "{body}");
    let readiness: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(
        readiness["broken_sources"]["faq"]["detail"]
            .as_str()
            .unwrap()
            .contains("column t.answer does not exist"),
        "{body}"
    );
    let (_, metrics) = daemon.http_get("/metrics").await;
    assert_eq!(
        sample(&metrics, "kbsync_source_broken", &[("source", "faq")]),
        Some(1.0)
    );
    assert_eq!(
        sample(&metrics, "kbsync_source_broken", &[("source", "product")]),
        Some(0.0)
    );

    // No loop: over the next seconds the source is tried every 2 s, and its key is
    // never charged an attempt (the row is not at fault).
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (_, metrics) = daemon.http_get("/metrics").await;
    let tries = sample(
        &metrics,
        "kbsync_batches_total",
        &[("source", "faq"), ("outcome", "source_broken")],
    )
    .unwrap();
    let allowed = 2.0 + broken_at.elapsed().as_secs_f64() / 2.0;
    assert!(
        (1.0..=allowed).contains(&tries),
        "{tries} tries in {:?}",
        broken_at.elapsed()
    );
    let attempts: i32 = t
        .client
        .query_one(
            "SELECT max(attempts) FROM kbsync.outbox WHERE source = 'faq'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(attempts, 0);
    assert_eq!(
        daemon
            .log()
            .matches("source broken: no batch of it can be written")
            .count(),
        1,
        "{}",
        daemon.log()
    );

    // Fixed: the next try goes through and everything is as it should be.
    t.client
        .batch_execute("ALTER TABLE web_knowledge_qapair RENAME COLUMN answer_text TO answer")
        .await
        .unwrap();
    converged(&t.client, &daemon).await;
    wait_for_daemon(&daemon, WAIT, "ready again", || async {
        (daemon.http_get("/readyz").await.0 == 200).then_some(())
    })
    .await;
    let out = t.db.kbsync_with_config(config.path(), &["status"]);
    assert!(!out.stdout.contains("BROKEN"), "{}", out.stdout);
    assert!(
        daemon.log().contains("source works again"),
        "{}",
        daemon.log()
    );
    let (_, metrics) = daemon.http_get("/metrics").await;
    assert_eq!(
        sample(&metrics, "kbsync_source_broken", &[("source", "faq")]),
        Some(0.0)
    );
}

/// The metric names README.md writes as `kbsync_...` (families like
/// `kbsync_model_migration_*` and other things named kbsync_ left out).
fn metric_names_in_readme() -> Vec<String> {
    let readme = std::fs::read_to_string(kbsync_testkit::repo_root().join("README.md")).unwrap();
    let not_metrics = ["kbsync_daemon", "kbsync_core", "kbsync_test"];
    let mut named: Vec<String> = Vec::new();
    for (i, _) in readme.match_indices("`kbsync_") {
        let name: String = readme[i + 1..]
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || *c == '_')
            .collect();
        let family = readme[i + 1 + name.len()..].starts_with('*');
        if name.ends_with('_')
            || family
            || named.contains(&name)
            || not_metrics.iter().any(|x| name.starts_with(x))
        {
            continue;
        }
        named.push(name);
    }
    assert!(named.len() > 20, "{named:?}");
    named
}

/// Names of `names` with no series or no HELP text in `metrics`.
fn absent<'a>(metrics: &str, names: impl Iterator<Item = &'a String>) -> Vec<&'a String> {
    let present = |name: &str| {
        metrics.contains(&format!("# HELP {name} "))
            && metrics.lines().any(|l| {
                !l.starts_with('#')
                    && (l.starts_with(&format!("{name}{{"))
                        || l.starts_with(&format!("{name} "))
                        || l.starts_with(&format!("{name}_bucket")))
            })
    };
    names.filter(|n| !present(n)).collect()
}

/// Only a daemon with logical capture has these.
const LOGICAL_ONLY: &[&str] = &[
    "kbsync_replication_slot_retained_bytes",
    "kbsync_replication_slot_unconfirmed_bytes",
    "kbsync_changes_decoded_total",
];

#[tokio::test]
async fn a_fresh_daemon_exports_every_series_the_readme_names() {
    let named = metric_names_in_readme();
    for logical in [false, true] {
        let t = if logical {
            Installed::new_logical(DIMS, "100ms", "100ms").await
        } else {
            Installed::new(DIMS, "100ms", "100ms").await
        };
        let daemon: DaemonProcess = t.daemon();
        daemon.wait_until_listening(1, WAIT).await;
        let (code, metrics) = daemon.http_get("/metrics").await;
        assert_eq!(code, 200);
        let expected = named
            .iter()
            .filter(|n| logical || !LOGICAL_ONLY.contains(&n.as_str()));
        let missing = absent(&metrics, expected);
        assert!(
            missing.is_empty(),
            "logical = {logical}: absent from a fresh /metrics, or without HELP: {missing:?}\n{metrics}"
        );
    }
}
