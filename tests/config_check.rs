//! `kbsync config check`: the shipped config passes; broken configs fail naming the
//! file, the field and what is wrong, as do a missing model directory or API key. No
//! database needed (without one the check says what it could not check).

#![allow(clippy::unwrap_used)] // a failed setup step in a test should panic right there

use kbsync_testkit::{TempConfig, run_kbsync, shipped_config};

#[test]
fn shipped_config_passes_and_shows_next_reconcile_times() {
    let out = run_kbsync(&shipped_config(), &["config", "check"], &[]);
    out.assert_success();
    assert!(out.stdout.contains("kbsync.toml: OK"), "{}", out.stdout);
    // Daily at 03:00 UTC: three upcoming fire times.
    assert_eq!(
        out.stdout.matches(" 03:00:00 UTC").count(),
        3,
        "{}",
        out.stdout
    );
    for source in ["faq", "product", "page", "manual"] {
        assert!(
            out.stdout.contains(&format!("[sources.{source}]")),
            "{}",
            out.stdout
        );
    }
    assert!(
        out.stdout.contains("debounce = \"10s\""),
        "page window missing: {}",
        out.stdout
    );
}

#[test]
fn secrets_are_redacted_from_the_output() {
    let config = TempConfig::shipped_with(&[(
        "[embedding]",
        "[database]\nurl = \"postgres://app:hunter2@db.internal:5432/app\"\n\n[embedding]",
    )]);
    let out = run_kbsync(
        config.path(),
        &["config", "check"],
        &[(
            "KBSYNC_DATABASE_URL",
            "postgres://kb:envsecret@localhost/kb",
        )],
    );
    out.assert_success();
    let all = format!("{}{}", out.stdout, out.stderr);
    assert!(!all.contains("hunter2"), "{all}");
    assert!(!all.contains("envsecret"), "{all}");
    assert!(
        all.contains("postgres://app:***@db.internal:5432/app"),
        "{all}"
    );
}

#[test]
fn openai_key_value_is_never_printed() {
    let config = TempConfig::shipped_with(&[(
        "provider = \"local\"\nmodel = \"all-MiniLM-L6-v2\"\ndimensions = 384\nmodel_dir = \".kbsync/models/all-MiniLM-L6-v2\"",
        "provider = \"openai\"\nmodel = \"text-embedding-3-small\"\ndimensions = 1536\nbase_url = \"https://api.openai.com/v1\"\napi_key_env = \"MY_KEY\"",
    )]);
    let out = run_kbsync(
        config.path(),
        &["config", "check"],
        &[("MY_KEY", "sk-verysecret")],
    );
    out.assert_success();
    assert!(!format!("{}{}", out.stdout, out.stderr).contains("sk-verysecret"));
}

/// Each case: (what to replace in the shipped config, replacement, field, problem words).
#[test]
fn broken_configs_name_the_file_the_field_and_the_problem() {
    let cases: &[(&str, &str, &str, &str)] = &[
        // unknown key
        (
            "[daemon]\n",
            "[daemon]\nbatchsize = 10\n",
            "daemon",
            "unknown field `batchsize`",
        ),
        // a batch larger than one write transaction should carry
        (
            "batch_size = 256",
            "batch_size = 10001",
            "daemon.batch_size",
            "between 1 and 10000",
        ),
        // the index build's memory and workers
        (
            "build_memory_mb = 1024",
            "build_memory_mb = 0",
            "index.build_memory_mb",
            "between 1 and 1048576",
        ),
        (
            "build_workers = 1",
            "build_workers = 65",
            "index.build_workers",
            "at most 64",
        ),
        (
            "defer_above = 10000",
            "defer_above = -1",
            "index.defer_above",
            "invalid value",
        ),
        // bad cron
        (
            "schedule = \"0 0 3 * * *\"",
            "schedule = \"every night\"",
            "reconcile.schedule",
            "has 2 fields; kbsync wants 6 or 7",
        ),
        // an hour out of range is worded as the inclusive limit it is
        (
            "schedule = \"0 0 3 * * *\"",
            "schedule = \"0 0 24 * * *\"",
            "reconcile.schedule",
            "Hours must be at most 23",
        ),
        // five-field cron (the crate wants seconds first)
        (
            "schedule = \"0 0 3 * * *\"",
            "schedule = \"0 3 * * *\"",
            "reconcile.schedule",
            "has 5 fields; kbsync wants 6 or 7",
        ),
        // SQL injection through a table name
        (
            "table = \"web_knowledge_product\"",
            "table = \"web_knowledge_product; DROP TABLE accounts_user\"",
            "sources.product.table",
            "not a plain SQL identifier",
        ),
        // injection through a column placeholder
        (
            "text = \"{manual_prompt}\"",
            "text = \"{manual_prompt\\\"; DROP TABLE x; --}\"",
            "sources.manual.text",
            "not a plain SQL identifier",
        ),
        // wrong type
        (
            "dimensions = 384",
            "dimensions = \"big\"",
            "embedding.dimensions",
            "invalid type",
        ),
        // local model has 384 dimensions
        (
            "dimensions = 384",
            "dimensions = 1536",
            "embedding.dimensions",
            "384",
        ),
        // bad duration
        (
            "debounce = \"10s\"",
            "debounce = \"ten seconds\"",
            "sources.page.debounce",
            "",
        ),
        // max_wait shorter than the window
        (
            "debounce = \"30s\"",
            "debounce = \"30s\"\nmax_wait = \"10s\"",
            "sources.manual.max_wait",
            "shorter than debounce",
        ),
        // filter with two operators
        (
            "filter = [{ column = \"crawl_status\", equals = \"completed\" }]",
            "filter = [{ column = \"crawl_status\", equals = \"completed\", is_null = true }]",
            "sources.page.filter[0]",
            "exactly one of",
        ),
        // chunk too large for the model
        (
            "single_chunk = true",
            "single_chunk = true\nchunk_tokens = 5000",
            "sources.faq.chunk_tokens",
            "out of range",
        ),
        // bad source name
        (
            "[sources.manual]",
            "[sources.Manual-Prompt]",
            "sources.Manual-Prompt",
            "source name",
        ),
        // TOML syntax error
        ("[daemon]", "[daemon", "(syntax)", "TOML parse error"),
        // missing required field
        (
            "key = \"user_id\"\n",
            "",
            "sources.manual",
            "missing field `key`",
        ),
    ];
    for (from, to, field, problem) in cases {
        let config = TempConfig::shipped_with(&[(from, to)]);
        let out = run_kbsync(config.path(), &["config", "check"], &[]);
        out.assert_failure();
        let file = config.path().display().to_string();
        let expected_prefix = format!("error: {file}: {field}");
        assert!(
            out.stderr.contains(&expected_prefix) && out.stderr.contains(problem),
            "case {to:?}: expected {expected_prefix:?} and {problem:?} in:\n{}",
            out.stderr
        );
    }
}

#[test]
fn openai_without_its_key_in_the_environment_is_an_error_naming_the_variable() {
    let config = TempConfig::shipped_with(&[(
        "provider = \"local\"\nmodel = \"all-MiniLM-L6-v2\"\ndimensions = 384\nmodel_dir = \".kbsync/models/all-MiniLM-L6-v2\"",
        "provider = \"openai\"\nmodel = \"text-embedding-3-small\"\ndimensions = 1536\nbase_url = \"https://api.openai.com/v1\"",
    )]);
    let out = run_kbsync(config.path(), &["config", "check"], &[]);
    out.assert_failure();
    assert!(
        out.stderr
            .contains("environment variable OPENAI_API_KEY (embedding.api_key_env) is not set"),
        "{}",
        out.stderr
    );
}

#[test]
fn a_missing_model_directory_fails_the_check() {
    let config = TempConfig::shipped_with(&[(
        "model_dir = \".kbsync/models/all-MiniLM-L6-v2\"",
        "model_dir = \"/nonexistent/all-MiniLM-L6-v2\"",
    )]);
    let out = run_kbsync(config.path(), &["config", "check"], &[]);
    out.assert_failure();
    assert!(
        out.stderr.contains("/nonexistent/all-MiniLM-L6-v2"),
        "{}",
        out.stderr
    );
}

#[test]
fn a_next_model_without_its_key_names_its_own_section() {
    let config = TempConfig::shipped_with(&[(
        "[capture]",
        "[next_embedding]\nprovider = \"openai\"\nmodel = \"text-embedding-3-small\"\ndimensions = 1536\nbase_url = \"https://api.openai.com/v1\"\napi_key_env = \"NEXT_KEY\"\n\n[capture]",
    )]);
    let out = run_kbsync(config.path(), &["config", "check"], &[]);
    out.assert_failure();
    assert!(
        out.stderr
            .contains("environment variable NEXT_KEY (next_embedding.api_key_env) is not set"),
        "{}",
        out.stderr
    );
    run_kbsync(
        config.path(),
        &["config", "check"],
        &[("NEXT_KEY", "sk-next")],
    )
    .assert_success();
}

#[test]
fn a_missing_config_file_says_which_file() {
    let out = run_kbsync(
        std::path::Path::new("/nonexistent/kbsync.toml"),
        &["config", "check"],
        &[],
    );
    out.assert_failure();
    assert!(
        out.stderr
            .contains("cannot read config file /nonexistent/kbsync.toml"),
        "{}",
        out.stderr
    );
}
