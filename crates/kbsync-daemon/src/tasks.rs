//! The daemon's long-running tasks, each under a name, so that the first one to end
//! before shutdown (by returning, failing or panicking) is reported by name and why.

use std::collections::HashMap;
use std::fmt::Display;
use std::future::Future;

use tokio::task::{Id, JoinError, JoinSet};

#[derive(Default)]
pub struct Tasks {
    set: JoinSet<Result<(), String>>,
    names: HashMap<Id, String>,
}

impl Tasks {
    /// Run `task`, a loop that ends only when cancelled.
    pub fn spawn(
        &mut self,
        name: impl Into<String>,
        task: impl Future<Output = ()> + Send + 'static,
    ) {
        self.spawn_fallible(name, async move {
            task.await;
            Ok::<(), String>(())
        });
    }

    /// Run `task`, which may end with an error.
    pub fn spawn_fallible<E: Display>(
        &mut self,
        name: impl Into<String>,
        task: impl Future<Output = Result<(), E>> + Send + 'static,
    ) {
        let handle = self
            .set
            .spawn(async move { task.await.map_err(|e| e.to_string()) });
        self.names.insert(handle.id(), name.into());
    }

    /// Wait for the next task to end; None when none is left. `Some(Ok(name))`: it
    /// ended by itself, without an error; `Some(Err(why))`: which failed, and how.
    pub async fn next_end(&mut self) -> Option<Result<String, String>> {
        let ended = self.set.join_next_with_id().await?;
        Some(match ended {
            Ok((id, Ok(()))) => Ok(self.name(id)),
            Ok((id, Err(e))) => Err(format!("the {} task failed: {e}", self.name(id))),
            Err(e) => Err(self.describe_join_error(e)),
        })
    }

    /// Abort every task still running and wait for them.
    pub async fn shutdown(&mut self) {
        self.set.shutdown().await;
    }

    fn name(&self, id: Id) -> String {
        self.names
            .get(&id)
            .cloned()
            .unwrap_or_else(|| format!("unnamed ({id})"))
    }

    fn describe_join_error(&self, e: JoinError) -> String {
        let name = self.name(e.id());
        if e.is_panic() {
            let panic = e.into_panic();
            let message = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic without a message".to_owned());
            format!("the {name} task panicked: {message}")
        } else {
            format!("the {name} task was cancelled")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_task_that_ends_is_named_with_its_reason() {
        let mut tasks = Tasks::default();
        tasks.spawn_fallible("collector", async {
            Err::<(), _>("the database went away")
        });
        assert_eq!(
            tasks.next_end().await,
            Some(Err(
                "the collector task failed: the database went away".to_owned()
            ))
        );
        tasks.spawn("worker 3", async {});
        assert_eq!(tasks.next_end().await, Some(Ok("worker 3".to_owned())));
        tasks.spawn("sweeps", async { panic!("boom") });
        assert_eq!(
            tasks.next_end().await,
            Some(Err("the sweeps task panicked: boom".to_owned()))
        );
        assert_eq!(tasks.next_end().await, None);
    }
}
