//! Argument snapshots of the `vm` backend: finding a function's argument
//! node for an input, running an invocation that stops at `checkpoint()` to
//! write one (LRU-bounded per function), and making one on demand.

use super::{Function, Pooled, VmBackend, poisoned};
use crate::Error;
use crate::backends::vm_snapshots::{Restorable, input_hash};
use snapshots::{Label, Level};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;
use vmm::{Instance, Progress, Reply, RunError, Status};

impl VmBackend {
    /// The argument snapshot of `hash` for `f`, if there is one.
    pub(super) fn argument_node(&self, f: &Function, hash: &str) -> Result<Option<Arc<Restorable>>, Error> {
        if self.snapshots.arguments_per_function == 0 {
            return Ok(None);
        }
        if let Some(r) = f.arguments.lock().map_err(|_| poisoned())?.get(hash) {
            return Ok(Some(Arc::clone(r)));
        }
        let Some(id) = self.snapshots.find_argument(f.node.id, hash) else {
            return Ok(None);
        };
        // A refused argument node is skipped: this input starts from the
        // function node (and writes a new argument node).
        let r = match self.snapshots.restorable(id, Level::Argument) {
            Ok(r) => r,
            Err(e @ Error::SnapshotCorrupt { .. }) => {
                self.snapshots.refuse(id, &e);
                return Ok(None);
            }
            Err(e) => return Err(e),
        };
        f.arguments
            .lock()
            .map_err(|_| poisoned())?
            .insert(hash.to_owned(), Arc::clone(&r));
        Ok(Some(r))
    }

    /// Writes the argument snapshot of `hash` from `instance`, stopped at
    /// its checkpoint (restored from `f`'s function node), and trims the
    /// function's argument snapshots to the LRU bound.
    pub(super) fn capture_argument(&self, f: &Function, instance: &mut Instance, hash: &str) -> Result<(), Error> {
        let label = Label::argument(&f.name, &f.digest, hash);
        self.snapshots
            .create_child(instance, f.node.id, Level::Argument, label)?;
        f.has_arguments.store(true, Ordering::Relaxed);
        self.counters.argument_nodes.fetch_add(1, Ordering::Relaxed);
        let removed = self.snapshots.trim_arguments(f.node.id);
        if !removed.is_empty() {
            f.arguments
                .lock()
                .map_err(|_| poisoned())?
                .retain(|_, r| !removed.contains(&r.id));
        }
        Ok(())
    }

    /// Runs one invocation on `pooled`: resumes it if it is stopped at a
    /// checkpoint; otherwise runs `handle()`, and with `capture` stops at the
    /// function's `checkpoint()` to write the input's argument snapshot. An
    /// instance in a VMM host process cannot be saved here: it only stops
    /// there, is resumed at once, and `*checkpointed` says it did (the
    /// caller makes the argument snapshot in this process afterwards).
    pub(super) fn run(
        &self,
        f: &Function,
        pooled: &mut Pooled,
        input: &[u8],
        capture: bool,
        checkpointed: &mut bool,
    ) -> Result<Reply, RunError> {
        let instance = &mut pooled.instance;
        if instance.is_remote() {
            instance.set_reply_spin(self.reply_spin());
        }
        let mut deadline = Instant::now() + f.budget;
        let mut progress = if instance.at_checkpoint() {
            instance.resume(deadline)?
        } else {
            instance.invoke_with(input, deadline, capture)?
        };
        let mut captured = false;
        loop {
            match progress {
                Progress::Replied(reply) => return Ok(reply),
                Progress::Checkpoint => {
                    if instance.is_remote() {
                        *checkpointed = true;
                    } else if capture && !captured {
                        captured = true;
                        let t = Instant::now();
                        let hash = input_hash(&f.digest, input);
                        if self.capture_argument(f, instance, &hash).is_err() {
                            self.counters.snapshot_failures.fetch_add(1, Ordering::Relaxed);
                        }
                        // Writing the snapshot is not the function's time.
                        deadline += t.elapsed();
                    }
                    progress = instance.resume(deadline)?;
                }
            }
        }
    }

    /// Makes the argument snapshot of `input` by running it from the
    /// function snapshot up to its `checkpoint()`; `None` if the function
    /// finished without calling it (or argument snapshots are off).
    pub(super) fn make_argument(&self, f: &Function, input: &[u8]) -> Result<Option<Arc<Restorable>>, Error> {
        if self.snapshots.arguments_per_function == 0 {
            return Ok(None);
        }
        // Made in this process: writing the node needs the VM's memory here.
        let mut pooled = self.restore_local(&f.node)?;
        let result = self.run(f, &mut pooled, input, true, &mut false);
        let failed = match result {
            Ok(reply) if reply.status == Status::Ok => None,
            Ok(reply) => Some(self.reply_error(&f.name, &pooled.instance, reply.status, &reply.data, false)),
            Err(e) => Some(self.run_error(&f.name, &pooled.instance, e, f.budget)),
        };
        self.give_back(f, pooled)?;
        if let Some(e) = failed {
            return Err(e);
        }
        self.argument_node(f, &input_hash(&f.digest, input))
    }
}
