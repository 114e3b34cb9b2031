//! One loaded, initialised function: its heap, its stack, and the entry
//! calls made on that stack.

use super::heap::{Arena, InstanceHeap};
use super::loader::LoadedFunction;
use super::services::{Context, MAX_MESSAGE_BYTES, Reported};
use super::stack::GuardedStack;
use super::trap::{self, ActiveCall, Exit};
use super::{Failure, InstanceConfig, RuntimeError};
use corosensei::{Coroutine, CoroutineResult};
use microfaas_sdk::{HandleResult, HostServices, fail_kind, status};
use std::ptr;

/// A function instance: a [`LoadedFunction`] with its own heap (limit from
/// [`InstanceConfig`]) and its own guarded stack. Entry calls run on that
/// stack; a panic, out-of-memory, stack overflow, memory fault or preemption
/// ends the call with a [`Failure`] and control returns here.
///
/// Not `Send`: the fault handlers find the running call through a
/// thread-local, so an instance is driven from one thread.
#[derive(Debug)]
pub struct Instance {
    // Field order: the context and stack go before the image is unmapped.
    ctx: Box<ContextCell>,
    stack: GuardedStack,
    initialised: bool,
    poisoned: bool,
    function: LoadedFunction,
}

/// `Context` behind a Debug impl.
struct ContextCell(Box<Context>);

impl std::fmt::Debug for ContextCell {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("heap", &self.0.heap)
            .finish_non_exhaustive()
    }
}

impl Instance {
    /// Sets up the heap and stack for `function` and prepares this thread's
    /// fault handling. Does not run `init`; see [`Instance::init`].
    pub fn new(function: LoadedFunction, config: &InstanceConfig) -> Result<Self, RuntimeError> {
        trap::prepare_thread().map_err(RuntimeError::Signals)?;
        let heap = InstanceHeap::new(config.heap_limit_bytes).map_err(RuntimeError::Heap)?;
        let stack = GuardedStack::new(config.stack_bytes).map_err(RuntimeError::Stack)?;
        Ok(Self {
            ctx: Box::new(ContextCell(Context::boxed(heap))),
            stack,
            initialised: false,
            poisoned: false,
            function,
        })
    }

    /// The loaded artifact.
    pub fn function(&self) -> &LoadedFunction {
        &self.function
    }

    /// Whether the instance must be discarded: `init` failed, or a fault hit
    /// while a host service was updating the instance's own state.
    pub fn poisoned(&self) -> bool {
        self.poisoned
    }

    /// Heap bytes in use (persistent + current invocation).
    pub fn heap_used_bytes(&self) -> usize {
        self.ctx.0.heap.used_bytes()
    }

    /// Usable stack bytes.
    pub fn stack_bytes(&self) -> usize {
        self.stack.usable_bytes()
    }

    /// `checkpoint()` calls seen so far.
    pub fn checkpoints(&self) -> u64 {
        self.ctx.0.checkpoints
    }

    /// Runs the function's `init()` once (allocations go to the persistent
    /// arena). A failure poisons the instance.
    pub fn init(&mut self) -> Result<(), Failure> {
        if self.poisoned {
            return Err(Failure::Poisoned);
        }
        if self.initialised {
            return Ok(());
        }
        self.ctx.0.heap.set_active(Arena::Persistent);
        let init = self.function.init_fn();
        let mut code = status::NOT_RUN;
        let code_ptr: *mut u32 = &mut code;
        let exit = self.call(move |host| {
            // SAFETY: `host` is the instance's table, valid for the call;
            // `code_ptr` points at a local that outlives the call.
            unsafe { *code_ptr = init(host) };
        });
        let result = match exit {
            Exit::Returned => match code {
                status::OK => Ok(()),
                // An SDK that reports init errors through `fail` never
                // gets here; this is an artifact that returned ERROR bare.
                status::ERROR => Err(Failure::FunctionError {
                    message: "(no message)".to_owned(),
                }),
                status::BAD_ABI => Err(Failure::BadAbi),
                other => Err(Failure::Malformed {
                    detail: format!("init returned unknown status {other}"),
                }),
            },
            other => Err(self.failure_of(other)),
        };
        match result {
            Ok(()) => self.initialised = true,
            Err(_) => self.poisoned = true,
        }
        result
    }

    /// Runs `handle(input)` (allocations go to the invocation arena). On
    /// success the output borrows the instance; the invocation arena is
    /// reset when the [`Output`] is dropped (or right away on failure).
    pub fn handle(&mut self, input: &[u8]) -> Result<Output<'_>, Failure> {
        if self.poisoned {
            return Err(Failure::Poisoned);
        }
        if !self.initialised {
            self.init()?;
        }
        self.ctx.0.heap.set_active(Arena::Invocation);
        let handle = self.function.handle_fn();
        let mut result = HandleResult::empty();
        let result_ptr: *mut HandleResult = &mut result;
        let (input_ptr, input_len) = (input.as_ptr(), input.len());
        let exit = self.call(move |host| {
            // SAFETY: `host` is valid for the call, `input` is a live slice
            // and `result_ptr` a local, both outliving the call.
            unsafe { handle(host, input_ptr, input_len, result_ptr) };
        });
        let outcome = match exit {
            Exit::Returned => self.decode(&result),
            other => Err(self.failure_of(other)),
        };
        match outcome {
            Ok((ptr, len)) => Ok(Output {
                ptr,
                len,
                entered_ns: result.entered_ns,
                returned_ns: result.returned_ns,
                instance: self,
            }),
            Err(failure) => {
                self.ctx.0.heap.reset_invocation();
                Err(failure)
            }
        }
    }

    /// Checks a returned `HandleResult`: the bytes must lie inside the
    /// instance's heap. Returns the output's location.
    fn decode(&self, result: &HandleResult) -> Result<(*const u8, usize), Failure> {
        let heap = &self.ctx.0.heap;
        let located = |ptr: *mut u8, len: usize| -> Result<(*const u8, usize), Failure> {
            if len == 0 {
                return Ok((ptr::null(), 0));
            }
            match heap.arena_of(ptr.addr(), len) {
                Some(_) => Ok((ptr.cast_const(), len)),
                None => Err(Failure::Malformed {
                    detail: format!("result of {len} bytes lies outside the function heap"),
                }),
            }
        };
        match result.status {
            status::OK => located(result.ptr, result.len),
            status::ERROR => {
                let (ptr, len) = located(result.ptr, result.len)?;
                let message = if len == 0 {
                    String::new()
                } else {
                    // SAFETY: `located` checked the range lies in the heap,
                    // which is mapped and which the function wrote.
                    let bytes = unsafe { std::slice::from_raw_parts(ptr, len.min(MAX_MESSAGE_BYTES)) };
                    String::from_utf8_lossy(bytes).into_owned()
                };
                Err(Failure::FunctionError { message })
            }
            status::BAD_ABI => Err(Failure::BadAbi),
            other => Err(Failure::Malformed {
                detail: format!("handle finished with status {other}"),
            }),
        }
    }

    fn failure_of(&mut self, exit: Exit) -> Failure {
        if self.ctx.0.torn.load(std::sync::atomic::Ordering::Relaxed) {
            self.poisoned = true;
        }
        match exit {
            Exit::Returned => Failure::Malformed {
                detail: "returned".to_owned(),
            },
            Exit::Failed => match self.ctx.0.reported.take() {
                Some(Reported {
                    kind: fail_kind::OUT_OF_MEMORY,
                    message,
                }) => Failure::OutOfMemory {
                    message,
                    limit_bytes: self.ctx.0.heap.limit_bytes(),
                },
                Some(Reported {
                    kind: fail_kind::PANIC,
                    message,
                }) => Failure::Panicked { message },
                // `init` returned an error (only the SDK's init shim reports it).
                Some(Reported {
                    kind: fail_kind::INIT_ERROR,
                    message,
                }) => Failure::FunctionError { message },
                Some(Reported { kind, message }) => Failure::Malformed {
                    detail: format!("fail() with unknown kind {kind}: {message}"),
                },
                None => Failure::Malformed {
                    detail: "failed without a report".to_owned(),
                },
            },
            Exit::StackOverflow => Failure::StackOverflow {
                stack_bytes: self.stack.usable_bytes(),
            },
            Exit::Fault { signal, addr } => Failure::Fault { signal, addr },
            Exit::Preempted => Failure::Preempted,
        }
    }

    /// Runs `entry` on the function stack and reports how it ended.
    fn call<F: FnOnce(*const HostServices)>(&mut self, entry: F) -> Exit {
        let ctx: *mut Context = &mut *self.ctx.0;
        // SAFETY: `ctx` is the live boxed context; no other reference to it
        // is used until the call ends.
        unsafe { (*ctx).begin_call() };
        let guard = self.stack.guard_range();
        let body = move |yielder: &corosensei::Yielder<(), Exit>, ()| {
            // SAFETY: `ctx` is live for the whole call (see below).
            unsafe { (*ctx).yielder = yielder };
            // SAFETY: as above.
            entry(unsafe { ptr::addr_of!((*ctx).services) });
            Exit::Returned
        };
        // SAFETY: `body` borrows nothing but raw pointers to the context
        // (which outlives the coroutine: both live in `self`) and `entry`'s
        // own captures, which the caller keeps alive until `call` returns;
        // the coroutine is finished (returned or force-reset) and dropped
        // before `call` returns.
        let mut coroutine =
            unsafe { Coroutine::<(), Exit, Exit, &mut GuardedStack>::with_stack_unchecked(&mut self.stack, body) };
        let active = ActiveCall {
            trap: coroutine.trap_handler(),
            guard,
            // SAFETY: the address of a field of the live context.
            in_host: unsafe { ptr::addr_of!((*ctx).in_host) },
            // SAFETY: as above.
            preempt_pending: unsafe { ptr::addr_of!((*ctx).preempt_pending) },
            // SAFETY: as above.
            torn: unsafe { ptr::addr_of!((*ctx).torn) },
        };
        let published = trap::activate(&active);
        let exit = match coroutine.resume(()) {
            CoroutineResult::Return(exit) => exit,
            CoroutineResult::Yield(exit) => {
                // SAFETY: the function left through `fail` or a deferred
                // preemption and is never resumed. Nothing on its stack needs
                // dropping: the runtime's frames there hold no owned values
                // across the switch, and the function's own blocks live in
                // its heap, which the runtime resets.
                unsafe { coroutine.force_reset() };
                exit
            }
        };
        drop(published);
        drop(coroutine);
        // SAFETY: the call is over; `ctx` is live.
        unsafe { (*ctx).yielder = ptr::null() };
        exit
    }
}

/// An instance's memory without its function: the heap and stack mappings
/// (and fault-handling context), kept so that the next cold start skips
/// mapping and faulting in fresh memory. (Added for the language worker's
/// cold path.)
#[derive(Debug)]
pub struct InstanceShell {
    ctx: Box<ContextCell>,
    stack: GuardedStack,
}

impl Instance {
    /// Unmaps the function's image and keeps the memory for
    /// [`Instance::from_shell`].
    pub fn into_shell(self) -> InstanceShell {
        let Instance {
            ctx, stack, function, ..
        } = self;
        drop(function);
        InstanceShell { ctx, stack }
    }

    /// An instance of `function` in recycled memory: both heap arenas are
    /// reset and the stack is reused. Like [`Instance::new`], `init` has not
    /// run.
    pub fn from_shell(function: LoadedFunction, mut shell: InstanceShell) -> Self {
        shell.ctx.0.heap.reset_all();
        shell.ctx.0.checkpoints = 0;
        Self {
            ctx: shell.ctx,
            stack: shell.stack,
            initialised: false,
            poisoned: false,
            function,
        }
    }
}

/// A successful invocation's output, borrowed from the instance's heap. The
/// invocation arena is reset when this is dropped.
#[derive(Debug)]
pub struct Output<'a> {
    instance: &'a mut Instance,
    ptr: *const u8,
    len: usize,
    /// The function's entry timestamp (`CLOCK_MONOTONIC` ns).
    pub entered_ns: u64,
    /// The function's return timestamp (`CLOCK_MONOTONIC` ns).
    pub returned_ns: u64,
}

impl Output<'_> {
    /// The output bytes.
    pub fn bytes(&self) -> &[u8] {
        if self.len == 0 {
            return &[];
        }
        // SAFETY: `Instance::decode` checked the range lies inside the heap,
        // whose invocation arena is not reset before `self` is dropped.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl Drop for Output<'_> {
    fn drop(&mut self) {
        self.instance.ctx.0.heap.reset_invocation();
    }
}
