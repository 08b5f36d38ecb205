//! The Django example (`examples/django`): a real Django application writes through its
//! ORM while the real daemon runs, then reads the knowledge back through its unmanaged
//! model (`examples/django/scenario/orm_writes.py` holds those steps and their checks).
//! Python, Django, psycopg and pgvector come from PyPI into a git-ignored virtual
//! environment that `scripts/venv.sh` makes; nothing pre-installed is assumed.

use std::path::PathBuf;
use std::process::{Command, Output};

use kbsync_testkit::demo_state::TEST_MODEL;
use kbsync_testkit::{DaemonProcess, FakeOpenAi, TestDb, repo_root, sync_config_from};

/// Wide enough that the test server's word vectors rarely share a dimension.
const DIMS: usize = 256;

fn example_dir() -> PathBuf {
    repo_root().join("examples/django")
}

/// The example's python, its environment made (once) by scripts/venv.sh.
fn django_python() -> PathBuf {
    let out = Command::new(repo_root().join("scripts/venv.sh"))
        .args(["django", "examples/django/requirements.txt"])
        .output()
        .expect("running scripts/venv.sh");
    assert!(
        out.status.success(),
        "scripts/venv.sh django examples/django/requirements.txt failed (it needs python3 with venv and access to PyPI):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// Run the example's python in examples/django against `db`, searching through `server`.
fn django(python: &PathBuf, db: &TestDb, server: &FakeOpenAi, args: &[&str]) -> Output {
    Command::new(python)
        .args(args)
        .current_dir(example_dir())
        .env("DATABASE_URL", db.url())
        .env("EMBEDDING_BASE_URL", server.base_url())
        .env("EMBEDDING_MODEL", TEST_MODEL)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .output()
        .expect("running the example's python")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn writes_through_the_django_orm_reach_the_knowledge_base_and_read_back_through_it() {
    let python = django_python();
    let server = FakeOpenAi::start(DIMS).await;
    // So that a search for a question finds the chunk that holds it.
    server.vectors_from_words(true);
    let db = TestDb::create().await;

    // The application's tables come from its own migrations and hold data; kbsync's
    // install follows.
    let migrated = django(
        &python,
        &db,
        &server,
        &["manage.py", "migrate", "--noinput"],
    );
    assert!(
        migrated.status.success(),
        "manage.py migrate failed:\n{}{}",
        text(&migrated.stdout),
        text(&migrated.stderr)
    );
    let config = sync_config_from(
        &example_dir().join("kbsync.toml"),
        &server.base_url(),
        DIMS,
        "0s",
        "0s",
    );
    // The shop already has data when it adopts kbsync.
    let existing = django(
        &python,
        &db,
        &server,
        &["-m", "scenario.orm_writes", "existing"],
    );
    assert!(
        existing.status.success(),
        "writing the existing rows failed:\n{}",
        text(&existing.stderr)
    );
    let install = db.kbsync_with_config(config.path(), &["install"]);
    install.assert_success();
    // What the README's cut-over shows `kbsync install` printing about them.
    let readme =
        std::fs::read_to_string(kbsync_testkit::repo_root().join("README.md")).expect("README.md");
    let shown = readme
        .split_once("   existing rows (reconcile run 1):\n")
        .and_then(|(_, rest)| rest.split_once("   ```"))
        .expect("README.md shows install's existing rows")
        .0;
    let printed = install
        .stdout
        .split_once("existing rows (reconcile run 1):\n")
        .expect("install reports the existing rows")
        .1;
    let shown: Vec<&str> = shown.lines().map(str::trim).collect();
    let printed: Vec<&str> = printed.lines().map(str::trim).collect();
    assert_eq!(
        printed, shown,
        "README.md's cut-over shows another install output"
    );
    let daemon = DaemonProcess::start(config.path(), db.url());

    let scenario = django(&python, &db, &server, &["-m", "scenario.orm_writes"]);
    assert!(
        scenario.status.success(),
        "the Django scenario failed:\n{}\n--- daemon log ---\n{}",
        text(&scenario.stderr),
        daemon.log()
    );
    let facts: serde_json::Value = serde_json::from_str(
        text(&scenario.stdout)
            .lines()
            .last()
            .expect("the scenario printed its facts"),
    )
    .expect("the scenario's facts are JSON");

    // What the provider was paid for: each text once, and nothing for a save() that
    // changed no text, nor for an edit of a column that is only metadata.
    let inputs: Vec<String> = server.requests().concat();
    let sent = |needle: &serde_json::Value| {
        let needle = needle.as_str().expect("a fact is a string");
        inputs.iter().filter(|i| i.contains(needle)).count()
    };
    assert_eq!(
        sent(&facts["touched_question"]),
        1,
        "a save() that changed only updated_at was embedded again"
    );
    assert_eq!(
        sent(&facts["metadata_only_product"]),
        1,
        "an edit of in_stock (metadata, not text) was embedded again"
    );
    assert_eq!(
        sent(&facts["edited_answer"]),
        1,
        "the edited FAQ's new text"
    );
    assert_eq!(
        inputs
            .iter()
            .filter(|i| i.starts_with("Seasonal bun"))
            .count(),
        facts["bulk_created"].as_u64().expect("a count") as usize,
        "each bulk_create row embedded once"
    );

    // What the README's guide checks after the cut-over: every source fully covered,
    // nothing behind, and a sweep that finds nothing to repair.
    let kbsync = |args: &[&str]| {
        let out = db.kbsync_with_config(config.path(), args);
        out.assert_success();
        out.stdout
    };
    let status: serde_json::Value =
        serde_json::from_str(&kbsync(&["status", "--json"])).expect("status --json");
    let sources = status["sources"].as_array().expect("sources");
    assert_eq!(sources.len(), 4, "{status}");
    for source in sources {
        assert_eq!(
            (
                &source["coverage"],
                &source["backlog"],
                &source["chunks_without_embedding"]
            ),
            (
                &serde_json::json!(1.0),
                &serde_json::json!(0),
                &serde_json::json!(0)
            ),
            "{source}"
        );
    }
    let sweep: serde_json::Value =
        serde_json::from_str(&kbsync(&["reconcile", "--dry-run", "--json"]))
            .expect("reconcile --json");
    for source in sweep["sources"].as_array().expect("sources") {
        assert_eq!(source["in_sync_by_fingerprint"], true, "{source}");
    }
    // Shown in the README's guide (cargo nextest ... --no-capture prints them).
    println!("$ kbsync status\n{}", kbsync(&["status"]));
    println!(
        "$ kbsync reconcile --dry-run\n{}",
        kbsync(&["reconcile", "--dry-run"])
    );
}
