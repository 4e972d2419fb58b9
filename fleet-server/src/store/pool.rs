//! A bounded pool of database connections, shared by both stores: SQLite's readers (WAL lets
//! them read while the one writer writes) and PostgreSQL's clients. A caller takes an idle
//! connection, or opens one while fewer than `limit` are open, or waits for one to come back.
//! A connection is opened on first need, so a quiet server holds one.

use std::sync::{Condvar, Mutex, MutexGuard};

use super::StoreError;

/// Opens one more connection for the pool.
type Opener<C> = Box<dyn Fn() -> Result<C, StoreError> + Send + Sync>;

pub(crate) struct Pool<C> {
    state: Mutex<PoolState<C>>,
    returned: Condvar,
    limit: usize,
    open: Opener<C>,
}

struct PoolState<C> {
    idle: Vec<C>,
    open: usize,
}

impl<C> Pool<C> {
    /// A pool of at most `limit` connections (at least one), opened by `open` when needed.
    pub(crate) fn new(limit: usize, open: impl Fn() -> Result<C, StoreError> + Send + Sync + 'static) -> Pool<C> {
        Pool {
            state: Mutex::new(PoolState { idle: Vec::new(), open: 0 }),
            returned: Condvar::new(),
            limit: limit.max(1),
            open: Box::new(open),
        }
    }

    fn state(&self) -> MutexGuard<'_, PoolState<C>> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// An idle connection, a new one while the pool is below its limit, or the next one given back.
    pub(crate) fn get(&self) -> Result<Pooled<'_, C>, StoreError> {
        let mut state = self.state();
        loop {
            if let Some(conn) = state.idle.pop() {
                return Ok(Pooled { conn: Some(conn), pool: self });
            }
            if state.open < self.limit {
                state.open += 1;
                drop(state);
                return match (self.open)() {
                    Ok(conn) => Ok(Pooled { conn: Some(conn), pool: self }),
                    Err(e) => {
                        self.forget_one();
                        Err(e)
                    }
                };
            }
            state = self.returned.wait(state).unwrap_or_else(|poisoned| poisoned.into_inner());
        }
    }

    /// Counts a connection opened elsewhere as one of the pool's and lends it out.
    pub(crate) fn adopt(&self, conn: C) -> Pooled<'_, C> {
        self.state().open += 1;
        Pooled { conn: Some(conn), pool: self }
    }

    /// One opened connection is gone (it failed to open, or its holder found it broken).
    fn forget_one(&self) {
        self.state().open -= 1;
        self.returned.notify_one();
    }

    /// Every idle connection, taken out of the pool (to close them somewhere else).
    pub(crate) fn take_idle(&self) -> Vec<C> {
        let mut state = self.state();
        let idle = std::mem::take(&mut state.idle);
        state.open -= idle.len();
        idle
    }

    #[cfg(test)]
    fn open_count(&self) -> usize {
        self.state().open
    }
}

/// A connection out of the pool; it goes back when dropped, unless `discard`ed.
pub(crate) struct Pooled<'a, C> {
    conn: Option<C>,
    pool: &'a Pool<C>,
}

impl<C> Pooled<'_, C> {
    /// Closes this connection instead of giving it back (it is broken); the pool opens a new one
    /// when next needed.
    pub(crate) fn discard(mut self) {
        self.conn.take();
        self.pool.forget_one();
    }
}

impl<C> std::ops::Deref for Pooled<'_, C> {
    type Target = C;
    fn deref(&self) -> &C {
        self.conn.as_ref().expect("a pooled connection is taken only by drop or discard")
    }
}

impl<C> std::ops::DerefMut for Pooled<'_, C> {
    fn deref_mut(&mut self) -> &mut C {
        self.conn.as_mut().expect("a pooled connection is taken only by drop or discard")
    }
}

impl<C> Drop for Pooled<'_, C> {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            self.pool.state().idle.push(conn);
            self.pool.returned.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[test]
    fn opens_on_need_reuses_and_never_exceeds_its_limit() {
        let opened = Arc::new(AtomicUsize::new(0));
        let counter = opened.clone();
        let pool = Arc::new(Pool::new(2, move || Ok(counter.fetch_add(1, Ordering::SeqCst))));
        {
            let a = pool.get().unwrap();
            let b = pool.get().unwrap();
            assert_eq!((*a, *b), (0, 1));
            let waiting = {
                let pool = pool.clone();
                std::thread::spawn(move || *pool.get().unwrap())
            };
            std::thread::sleep(std::time::Duration::from_millis(50));
            assert!(!waiting.is_finished(), "a third caller waits while two connections are out");
            drop(a);
            assert_eq!(waiting.join().unwrap(), 0, "the waiter gets the connection given back");
        }
        assert_eq!(opened.load(Ordering::SeqCst), 2);
        assert_eq!(pool.open_count(), 2);
        let _again = pool.get().unwrap();
        assert_eq!(opened.load(Ordering::SeqCst), 2, "an idle connection is reused, not opened again");
    }

    #[test]
    fn a_failed_open_or_a_discarded_connection_frees_its_place() {
        let attempts = Arc::new(AtomicUsize::new(0));
        let counter = attempts.clone();
        let pool = Pool::new(1, move || match counter.fetch_add(1, Ordering::SeqCst) {
            0 => Err(StoreError::Database("refused".into())),
            n => Ok(n),
        });
        assert!(pool.get().is_err());
        let first = pool.get().unwrap();
        assert_eq!(*first, 1);
        first.discard();
        assert_eq!(*pool.get().unwrap(), 2, "a discarded connection is replaced by a new one");
        assert_eq!(pool.take_idle(), vec![2]);
        assert_eq!(pool.open_count(), 0);
    }
}
