//! The dispatcher's side of tenants: finding or creating a tenant's
//! workers, pinning them, and starting them under the worker cap (stopping
//! the idle tenants used least recently, as `tenants::choose_evictions`
//! decides).

use super::Inner;
use crate::language::LanguageError;
use crate::language::pool::{WorkerHandle, lock};
use crate::language::shm::now_ns;
use crate::language::tenants::{Candidate, Pin, RUNNING, STOPPED, TenantWorkers, choose_evictions};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

impl Inner {
    /// A copy of the tenant list.
    pub(super) fn tenants_now(&self) -> Vec<Arc<TenantWorkers>> {
        self.tenants
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// `tenant`'s workers (not started), created on first sight with their
    /// own uid.
    pub(super) fn tenant(&self, tenant: &str) -> Result<Arc<TenantWorkers>, LanguageError> {
        let find = |list: &[Arc<TenantWorkers>]| list.iter().find(|g| g.tenant == tenant).cloned();
        if let Some(g) = find(&self.tenants.read().unwrap_or_else(std::sync::PoisonError::into_inner)) {
            return Ok(g);
        }
        let mut list = self.tenants.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(g) = find(&list) {
            return Ok(g);
        }
        let sandbox = self.config.sandbox.for_tenant(tenant)?;
        let ordinal = list.len();
        let mut workers = Vec::with_capacity(self.per_tenant);
        for i in 0..self.per_tenant {
            let name = format!("microfaas-lang-{ordinal}-{i}");
            workers.push(
                WorkerHandle::new(i, &name, self.layout)
                    .map_err(|e| LanguageError::io("creating a shared region", e))?,
            );
        }
        let g = Arc::new(TenantWorkers::new(
            tenant.to_owned(),
            sandbox.uid,
            sandbox.to_arg(),
            workers,
        ));
        list.push(Arc::clone(&g));
        self.tenants_version.fetch_add(1, Ordering::SeqCst);
        Ok(g)
    }

    /// Pins `g`, starting its workers first if they are not running.
    pub(super) fn pin<'a>(&self, g: &'a TenantWorkers) -> Result<Pin<'a>, LanguageError> {
        loop {
            if let Some(pin) = g.try_pin() {
                return Ok(pin);
            }
            self.start_tenant(g)?;
        }
    }

    /// Pins `g` only if its workers run (control requests that need no
    /// worker otherwise: a stopped tenant's next start reads the catalog).
    pub(super) fn pin_if_running<'a>(&self, g: &'a TenantWorkers) -> Option<Pin<'a>> {
        // Under the start lock the state is RUNNING or STOPPED, never in
        // between.
        let _starting = lock(&self.starts);
        g.try_pin()
    }

    /// Starts `g`'s workers unless they run, stopping the least recently
    /// used idle tenants first if the cap needs it; waits (up to the start
    /// timeout) while every other tenant is busy.
    pub(super) fn start_tenant(&self, g: &TenantWorkers) -> Result<(), LanguageError> {
        let give_up = std::time::Instant::now() + self.config.start_timeout;
        loop {
            let starting = lock(&self.starts);
            if g.state.load(Ordering::SeqCst) == RUNNING {
                return Ok(());
            }
            if self.make_room(g) {
                let started = self.spawn_tenant(g);
                drop(starting);
                return started;
            }
            drop(starting);
            if std::time::Instant::now() > give_up {
                return Err(LanguageError::AtCapacity {
                    detail: format!(
                        "{} workers run for other tenants (max_workers), all busy for {} ms",
                        self.max_workers,
                        self.config.start_timeout.as_millis()
                    ),
                });
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Under the start lock: stops idle tenants (least recently used
    /// first) until `g`'s workers fit under the cap. Whether they fit.
    pub(super) fn make_room(&self, g: &TenantWorkers) -> bool {
        let others: Vec<Arc<TenantWorkers>> = self
            .tenants_now()
            .into_iter()
            .filter(|t| !std::ptr::eq(&**t, g) && t.state.load(Ordering::SeqCst) == RUNNING)
            .collect();
        let candidates: Vec<Candidate> = others
            .iter()
            .map(|t| Candidate {
                last_used_ns: t.last_used_ns.load(Ordering::Relaxed),
                workers: t.workers.len(),
                idle: t.idle(),
            })
            .collect();
        let live = others.iter().map(|t| t.workers.len()).sum();
        let Some(victims) = choose_evictions(&candidates, live, g.workers.len(), self.max_workers) else {
            return false;
        };
        let mut all_stopped = true;
        for i in victims {
            if others[i].try_stop() {
                self.tenant_evictions.fetch_add(1, Ordering::Relaxed);
            } else {
                // Pinned meanwhile: decide again.
                all_stopped = false;
            }
        }
        all_stopped
    }

    /// Under the start lock: spawns every worker of a stopped `g`.
    pub(super) fn spawn_tenant(&self, g: &TenantWorkers) -> Result<(), LanguageError> {
        for w in &g.workers {
            w.gone.store(false, Ordering::SeqCst);
            if let Err(e) = self.spawn(g, w) {
                g.workers.iter().for_each(WorkerHandle::stop);
                g.state.store(STOPPED, Ordering::SeqCst);
                return Err(LanguageError::io("starting a worker", e));
            }
        }
        g.last_used_ns.store(now_ns(), Ordering::Relaxed);
        g.state.store(RUNNING, Ordering::SeqCst);
        Ok(())
    }
}
