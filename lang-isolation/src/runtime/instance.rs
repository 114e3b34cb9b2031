//! One loaded, initialised function: its heap, its stack, and the entry
//! calls made on that stack.

use super::heap::{Arena, HeapMemory, InstanceHeap, PersistentState};
use super::loader::LoadedFunction;
use super::pkeys::{self, GateCall, GateExit};
use super::services::{Context, ContextBox, GATED_WITH_KEYS, GATED_WITHOUT_KEYS, MAX_MESSAGE_BYTES, Reported, bail};
use super::stack::GuardedStack;
use super::trap::{self, ActiveCall, CallTrap, Exit};
use super::{Failure, InstanceConfig, RuntimeError};
use corosensei::{Coroutine, CoroutineResult};
use microfaas_sdk::{HandleResult, HostServices, fail_kind, status};
use std::ptr;

/// A function instance: a [`LoadedFunction`] with its own heap (limit from
/// [`InstanceConfig`]) and a guarded stack (its thread's shared one, or its
/// own once keyed). Entry calls run on that stack; a panic, out-of-memory,
/// stack overflow, memory fault or preemption ends the call with a
/// [`Failure`] and control returns here.
///
/// Not `Send`: the fault handlers find the running call through a
/// thread-local, so an instance is driven from one thread.
#[derive(Debug)]
pub struct Instance {
    // Field order: the context and stack go before the image is unmapped.
    ctx: ContextBox,
    heap_memory: HeapMemory,
    limit_bytes: usize,
    stack: GuardedStack,
    /// The protection key of all its memory, when calls are gated.
    key: Option<u32>,
    /// Calls go through the gate (with keys, or its copy without PKRU
    /// writes: [`Instance::new_gated_without_keys`]).
    gated: bool,
    initialised: bool,
    poisoned: bool,
    function: LoadedFunction,
}

impl Instance {
    /// Sets up the heap and stack for `function` and prepares this thread's
    /// fault handling. Does not run `init`; see [`Instance::init`].
    pub fn new(function: LoadedFunction, config: &InstanceConfig) -> Result<Self, RuntimeError> {
        let InstanceShell {
            ctx,
            heap_memory,
            limit_bytes,
            stack,
            key,
            gated,
        } = InstanceShell::new(config)?;
        Ok(Self {
            ctx,
            heap_memory,
            limit_bytes,
            stack,
            key,
            gated,
            initialised: false,
            poisoned: false,
            function,
        })
    }

    /// Like [`Instance::new`], with calls made through the protection-key
    /// gate's copy that writes no PKRU: the gate's control flow (stack
    /// switch, bail from `fail`, faults and preemption, the context in its
    /// own mapping, the input copy) on hosts without PKU. No isolation:
    /// for tests and benchmarks only.
    pub fn new_gated_without_keys(function: LoadedFunction, config: &InstanceConfig) -> Result<Self, RuntimeError> {
        pkeys::claim_gate_for_this_thread().map_err(RuntimeError::Keys)?;
        let mut instance = Self::new(function, config)?;
        instance.ctx.get_mut().gated = GATED_WITHOUT_KEYS;
        instance.gated = true;
        Ok(instance)
    }

    /// Like [`Instance::new`], with every byte of the instance's memory
    /// (heap, stack, context, the image's non-executable pages) under
    /// protection key `key`, and every entry call made through the
    /// protection-key gate: while the function runs, only `key` is
    /// accessible (see [`super::pkeys`]). The calling thread becomes the
    /// process's one gated thread.
    pub fn new_keyed(function: LoadedFunction, config: &InstanceConfig, key: u32) -> Result<Self, RuntimeError> {
        if !pkeys::cpu_has_ospke() {
            return Err(RuntimeError::Keys(std::io::Error::other("the CPU has no OSPKE")));
        }
        pkeys::claim_for_this_thread().map_err(RuntimeError::Keys)?;
        let mut instance = Self::new(function, config)?;
        instance.apply_key(key)?;
        Ok(instance)
    }

    fn apply_key(&mut self, key: u32) -> Result<(), RuntimeError> {
        self.heap_memory.set_key(key).map_err(RuntimeError::Keys)?;
        self.stack.set_key(key).map_err(RuntimeError::Keys)?;
        self.ctx.set_key(key).map_err(RuntimeError::Keys)?;
        self.function
            .set_key(key)
            .map_err(|e| RuntimeError::Keys(std::io::Error::other(e.to_string())))?;
        self.ctx.get_mut().gated = GATED_WITH_KEYS;
        self.key = Some(key);
        self.gated = true;
        Ok(())
    }

    /// The protection key of its memory, if its calls are gated.
    pub fn key(&self) -> Option<u32> {
        self.key
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
        self.ctx.get().heap.used_bytes()
    }

    /// Usable stack bytes.
    pub fn stack_bytes(&self) -> usize {
        self.stack.usable_bytes()
    }

    /// `checkpoint()` calls seen so far.
    pub fn checkpoints(&self) -> u64 {
        self.ctx.get().checkpoints
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
        self.ctx.get_mut().heap.set_active(Arena::Persistent);
        let init = self.function.init_fn();
        let mut code = status::NOT_RUN;
        let exit = if self.gated {
            let (exit, rax) = self.call_gated(init as *const () as usize, [0; 3]);
            code = u32::try_from(rax & 0xffff_ffff).unwrap_or(status::NOT_RUN);
            exit
        } else {
            let code_ptr: *mut u32 = &mut code;
            self.call(move |host| {
                // SAFETY: `host` is the instance's table, valid for the call;
                // `code_ptr` points at a local that outlives the call.
                unsafe { *code_ptr = init(host) };
            })
        };
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
        let result = result.and_then(|()| self.load_module());
        match result {
            Ok(()) => self.initialised = true,
            Err(_) => self.poisoned = true,
        }
        result
    }

    /// After `init`, for a function deployed with a module: runs
    /// `load(module)` (allocations go to the persistent arena, as init's).
    /// Gated, the module is first copied into the function's own (keyed)
    /// invocation arena, which is reset once `load` returns: the function
    /// copies what it keeps.
    fn load_module(&mut self) -> Result<(), Failure> {
        let Some(module) = self.function.module().cloned() else {
            return Ok(());
        };
        let Some(load) = self.function.load_fn() else {
            return Err(Failure::FunctionError {
                message: "the function takes no module (its artifact exports no microfaas_v1_load)".to_owned(),
            });
        };
        let mut code = status::NOT_RUN;
        let exit = if self.gated {
            let heap = &mut self.ctx.get_mut().heap;
            heap.set_active(Arena::Invocation);
            let copy = if module.is_empty() {
                std::ptr::NonNull::<u8>::dangling().as_ptr()
            } else {
                heap.alloc(module.len(), 1)
            };
            heap.set_active(Arena::Persistent);
            if copy.is_null() {
                self.reset_invocation();
                return Err(Failure::OutOfMemory {
                    message: format!("no room for the {}-byte module", module.len()),
                    limit_bytes: self.limit_bytes,
                });
            }
            // SAFETY: `copy` is a fresh block of `module.len()` bytes (or
            // dangling for an empty module, never written).
            unsafe { std::ptr::copy_nonoverlapping(module.as_ptr(), copy, module.len()) };
            let (exit, rax) = self.call_gated(load as *const () as usize, [copy.addr(), module.len(), 0]);
            code = u32::try_from(rax & 0xffff_ffff).unwrap_or(status::NOT_RUN);
            exit
        } else {
            let code_ptr: *mut u32 = &mut code;
            let (at, len) = (module.as_ptr(), module.len());
            self.call(move |host| {
                // SAFETY: `host` is the instance's table, valid for the call;
                // the module's bytes (kept alive by `module`, held until the
                // call returns) are readable; `code_ptr` points at a local
                // that outlives the call.
                unsafe { *code_ptr = load(host, at, len) };
            })
        };
        self.reset_invocation();
        drop(module);
        match exit {
            Exit::Returned => match code {
                status::OK => Ok(()),
                status::NO_LOAD => Err(Failure::FunctionError {
                    message: "the function takes no module (it declares no load)".to_owned(),
                }),
                status::ERROR => Err(Failure::FunctionError {
                    message: "(no message)".to_owned(),
                }),
                status::BAD_ABI => Err(Failure::BadAbi),
                other => Err(Failure::Malformed {
                    detail: format!("load returned unknown status {other}"),
                }),
            },
            other => Err(self.failure_of(other)),
        }
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
        self.ctx.get_mut().heap.set_active(Arena::Invocation);
        self.ctx.get_mut().scratch_used = 0;
        let handle = self.function.handle_fn();
        let mut result = HandleResult::empty();
        let exit = if self.gated {
            // The input is copied into the function's own (keyed) memory,
            // its context's scratch or else its heap: the shared slots stay
            // the runtime's.
            let ctx = self.ctx.as_ptr();
            let copy = if input.is_empty() {
                std::ptr::NonNull::<u8>::dangling().as_ptr()
            } else {
                // SAFETY: `ctx` is this instance's live context; no call is
                // in progress, so nothing else uses it.
                match unsafe { super::services::scratch_alloc(ctx, input.len(), 1) } {
                    Some(block) => block,
                    None => self.ctx.get_mut().heap.alloc(input.len(), 1),
                }
            };
            if copy.is_null() {
                self.reset_invocation();
                return Err(Failure::OutOfMemory {
                    message: format!("no room for the {}-byte input", input.len()),
                    limit_bytes: self.limit_bytes,
                });
            }
            // SAFETY: `copy` is a fresh block of `input.len()` bytes (or
            // dangling for an empty input, never written).
            unsafe { std::ptr::copy_nonoverlapping(input.as_ptr(), copy, input.len()) };
            let result_at = std::ptr::addr_of_mut!(self.ctx.get_mut().result).addr();
            let (exit, _) = self.call_gated(handle as *const () as usize, [copy.addr(), input.len(), result_at]);
            result = self.ctx.get().result;
            exit
        } else {
            let result_ptr: *mut HandleResult = &mut result;
            let (input_ptr, input_len) = (input.as_ptr(), input.len());
            self.call(move |host| {
                // SAFETY: `host` is valid for the call, `input` is a live slice
                // and `result_ptr` a local, both outliving the call.
                unsafe { handle(host, input_ptr, input_len, result_ptr) };
            })
        };
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
                self.reset_invocation();
                Err(failure)
            }
        }
    }

    /// Checks a returned `HandleResult`: the bytes must lie inside the
    /// instance's heap or its context's scratch. Returns the output's
    /// location.
    fn decode(&self, result: &HandleResult) -> Result<(*const u8, usize), Failure> {
        // The runtime's own bounds, not the (function-writable) allocator's.
        let heap = &self.heap_memory;
        let ctx: *const Context = self.ctx.get();
        let located = |ptr: *mut u8, len: usize| -> Result<(*const u8, usize), Failure> {
            if len == 0 {
                return Ok((ptr::null(), 0));
            }
            if super::services::in_scratch(ctx, ptr, len) {
                return Ok((ptr.cast_const(), len));
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
                    // SAFETY: `located` checked the range lies in the heap or
                    // the context's scratch, both mapped, which the function
                    // wrote.
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

    fn reset_invocation(&mut self) {
        let limit = self.limit_bytes;
        let memory = &self.heap_memory;
        self.ctx.get_mut().heap.reset_invocation(memory, limit);
    }

    fn failure_of(&mut self, exit: Exit) -> Failure {
        if self.ctx.get().torn.load(std::sync::atomic::Ordering::Relaxed) {
            self.poisoned = true;
        }
        match exit {
            Exit::Returned => Failure::Malformed {
                detail: "returned".to_owned(),
            },
            Exit::Failed => match self.ctx.get_mut().take_reported() {
                Some(Reported {
                    kind: fail_kind::OUT_OF_MEMORY,
                    message,
                }) => Failure::OutOfMemory {
                    message,
                    limit_bytes: self.limit_bytes,
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
            Exit::KeyViolation { addr, key } => Failure::KeyViolation {
                addr,
                key,
                own: self.key.unwrap_or(0),
            },
        }
    }

    /// Runs `target(host, args..)` on the function stack through the
    /// protection-key gate; returns how it ended and, after a return, `rax`.
    fn call_gated(&mut self, target: usize, args: [usize; 3]) -> (Exit, u64) {
        let key = self.key.unwrap_or(0);
        let ctx: *mut Context = self.ctx.as_ptr();
        // SAFETY: `ctx` is the live context; no other reference is used
        // until the call ends.
        unsafe { (*ctx).begin_call() };
        let stack = self.stack.full_range();
        let active = ActiveCall {
            trap: CallTrap::Gate {
                stack: stack.clone(),
                exit: std::cell::Cell::new(None),
            },
            guard: self.stack.guard_range(),
            // SAFETY: the address of a field of the live context.
            in_host: unsafe { ptr::addr_of!((*ctx).in_host) },
            // SAFETY: as above.
            preempt_pending: unsafe { ptr::addr_of!((*ctx).preempt_pending) },
            // SAFETY: as above.
            torn: unsafe { ptr::addr_of!((*ctx).torn) },
        };
        let call = GateCall {
            target,
            // SAFETY: as above.
            rdi: unsafe { ptr::addr_of!((*ctx).services) }.addr(),
            rsi: args[0],
            rdx: args[1],
            rcx: args[2],
            stack_top: stack.end,
            pkru: pkeys::function_pkru(key),
            writes_pkru: self.key.is_some(),
        };
        let published = trap::activate(&active);
        // SAFETY: this thread claimed the gate (`new_keyed`), calls are not
        // nested (the instance is borrowed mutably), the stack's usable part
        // and the context carry `key`, and `target` is an entry point of the
        // loaded image with the ABI's arguments.
        let how = unsafe { pkeys::gate_enter(&call) };
        drop(published);
        let CallTrap::Gate { exit: handled, .. } = &active.trap else {
            unreachable!("built as a gate call above")
        };
        match (how, handled.take()) {
            (GateExit::Returned(rax), _) => (Exit::Returned, rax),
            (GateExit::Bailed, Some(exit)) => (exit, 0),
            // SAFETY: the call is over; `ctx` is live.
            (GateExit::Bailed, None) => match unsafe { (*ctx).bail } {
                bail::FAILED => (Exit::Failed, 0),
                bail::PREEMPTED => (Exit::Preempted, 0),
                _ => (Exit::Fault { signal: 0, addr: 0 }, 0),
            },
        }
    }

    /// Runs `entry` on the function stack and reports how it ended.
    fn call<F: FnOnce(*const HostServices)>(&mut self, entry: F) -> Exit {
        let ctx: *mut Context = self.ctx.as_ptr();
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
            trap: CallTrap::Coroutine(coroutine.trap_handler()),
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
    ctx: ContextBox,
    heap_memory: HeapMemory,
    limit_bytes: usize,
    stack: GuardedStack,
    key: Option<u32>,
    gated: bool,
}

impl InstanceShell {
    /// Fresh memory for instances like [`Instance::new`]'s.
    pub fn new(config: &InstanceConfig) -> Result<Self, RuntimeError> {
        trap::prepare_thread().map_err(RuntimeError::Signals)?;
        let heap_memory = HeapMemory::new(config.heap_limit_bytes).map_err(RuntimeError::Heap)?;
        let heap = InstanceHeap::over(&heap_memory, config.heap_limit_bytes);
        // Shared with the thread's other instances until a key is applied
        // (see `super::stack`).
        let stack = GuardedStack::for_this_thread(config.stack_bytes).map_err(RuntimeError::Stack)?;
        let ctx = ContextBox::new(heap).map_err(RuntimeError::Heap)?;
        Ok(Self {
            ctx,
            heap_memory,
            limit_bytes: config.heap_limit_bytes,
            stack,
            key: None,
            gated: false,
        })
    }

    /// Fresh memory for instances like [`Instance::new_gated_without_keys`]'s.
    pub fn new_gated_without_keys(config: &InstanceConfig) -> Result<Self, RuntimeError> {
        pkeys::claim_gate_for_this_thread().map_err(RuntimeError::Keys)?;
        let mut shell = Self::new(config)?;
        shell.ctx.get_mut().gated = GATED_WITHOUT_KEYS;
        shell.gated = true;
        Ok(shell)
    }

    /// Fresh memory for instances like [`Instance::new_keyed`]'s (the
    /// image of each instance made in it gets `key` too).
    pub fn new_keyed(config: &InstanceConfig, key: u32) -> Result<Self, RuntimeError> {
        if !pkeys::cpu_has_ospke() {
            return Err(RuntimeError::Keys(std::io::Error::other("the CPU has no OSPKE")));
        }
        pkeys::claim_for_this_thread().map_err(RuntimeError::Keys)?;
        let mut shell = Self::new(config)?;
        shell.heap_memory.set_key(key).map_err(RuntimeError::Keys)?;
        shell.stack.set_key(key).map_err(RuntimeError::Keys)?;
        shell.ctx.set_key(key).map_err(RuntimeError::Keys)?;
        shell.ctx.get_mut().gated = GATED_WITH_KEYS;
        shell.key = Some(key);
        shell.gated = true;
        Ok(shell)
    }

    /// The protection key of the shell's memory, if any.
    pub fn key(&self) -> Option<u32> {
        self.key
    }

    /// The heap's memory.
    pub fn heap_memory(&self) -> &HeapMemory {
        &self.heap_memory
    }

    /// Address of the host-services context (a snapshot's `init` saw it).
    pub fn context_addr(&mut self) -> usize {
        self.ctx.as_ptr().addr()
    }
}

impl Instance {
    /// Unmaps the function's image and keeps the memory for
    /// [`Instance::from_shell`].
    /// Both heap arenas are reset here (the pages beyond the first 256 KiB
    /// of each given back), so that [`Instance::from_shell`] makes no
    /// system call.
    pub fn into_shell(self) -> InstanceShell {
        self.into_shell_sparing(0)
    }

    /// [`Instance::into_shell`], leaving the persistent arena's first
    /// `spared` bytes mapped as they are (see
    /// [`super::InstanceHeap::reset_all_sparing`]): for a snapshot-started
    /// instance whose heap pages `ImageSpace::leave` drops.
    pub fn into_shell_sparing(self, spared: usize) -> InstanceShell {
        let Instance {
            mut ctx,
            heap_memory,
            limit_bytes,
            stack,
            key,
            gated,
            function,
            ..
        } = self;
        drop(function);
        ctx.get_mut().heap.reset_all_sparing(&heap_memory, limit_bytes, spared);
        InstanceShell {
            ctx,
            heap_memory,
            limit_bytes,
            stack,
            key,
            gated,
        }
    }

    /// An instance of `function` in recycled memory: both heap arenas are
    /// reset and the stack is reused. Like [`Instance::new`], `init` has not
    /// run.
    /// A keyed shell keys the new image with its key too.
    pub fn from_shell(function: LoadedFunction, shell: InstanceShell) -> Result<Self, RuntimeError> {
        Self::from_shell_with(function, shell, true)
    }

    /// [`Instance::from_shell`]; `reset_persistent: false` leaves the
    /// persistent arena's bytes and allocator alone (for a snapshot's).
    fn from_shell_with(
        function: LoadedFunction,
        mut shell: InstanceShell,
        reset_persistent: bool,
    ) -> Result<Self, RuntimeError> {
        let memory = &shell.heap_memory;
        let ctx = shell.ctx.get_mut();
        if reset_persistent {
            ctx.heap.reset_state(memory, shell.limit_bytes);
        } else {
            ctx.heap.reset_invocation_state(memory, shell.limit_bytes);
        }
        ctx.checkpoints = 0;
        ctx.clock_reads = 0;
        let mut instance = Self {
            ctx: shell.ctx,
            heap_memory: shell.heap_memory,
            limit_bytes: shell.limit_bytes,
            stack: shell.stack,
            key: None,
            gated: shell.gated,
            initialised: false,
            poisoned: false,
            function,
        };
        if let Some(key) = shell.key {
            instance.apply_key(key)?;
        }
        Ok(instance)
    }
}

impl Instance {
    /// An instance of `function` in recycled memory whose `init` has
    /// already run: its image and the persistent arena of `shell`'s heap
    /// hold a post-init snapshot's bytes, and `state` is the allocator
    /// state captured with them. Refused (`None`, the shell given back) if
    /// `state` was captured over another heap.
    ///
    /// # Safety
    /// `function`'s writable pages and the persistent arena from its start
    /// to `state.high_water()` must hold the bytes they held right after
    /// the `init` that `state` was captured after, in the same shell
    /// (heap, context) at the same image address.
    pub unsafe fn from_shell_initialised(
        function: LoadedFunction,
        shell: InstanceShell,
        state: &PersistentState,
    ) -> Result<Result<Self, InstanceShell>, RuntimeError> {
        let mut instance = Self::from_shell_with(function, shell, false)?;
        let memory = &instance.heap_memory;
        // SAFETY: caller contract: the arena holds the captured bytes, and
        // nothing points into it (the instance is new).
        if !unsafe { instance.ctx.get_mut().heap.restore_persistent(memory, state) } {
            return Ok(Err(instance.into_shell()));
        }
        instance.initialised = true;
        Ok(Ok(instance))
    }

    /// Whether `init` has run (successfully).
    pub fn initialised(&self) -> bool {
        self.initialised
    }

    /// `clock_ns()` calls made since the instance was set up (the count is
    /// kept where the function can write it).
    pub fn clock_reads(&self) -> u64 {
        self.ctx.get().clock_reads
    }

    /// The heap's memory.
    pub fn heap_memory(&self) -> &HeapMemory {
        &self.heap_memory
    }

    /// The persistent arena's allocator state, right after `init` (no
    /// invocation in progress): see [`InstanceHeap::persistent_state`].
    pub fn persistent_state(&self) -> Option<PersistentState> {
        if !self.initialised || self.poisoned {
            return None;
        }
        self.ctx.get().heap.persistent_state(&self.heap_memory)
    }

    /// Address of the host-services context.
    pub fn context_addr(&mut self) -> usize {
        self.ctx.as_ptr().addr()
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
    /// Heap bytes in use while the output lives (its own block, unless it
    /// came from the call's context scratch, and whatever the call did not
    /// free).
    pub fn heap_used_bytes(&self) -> usize {
        self.instance.heap_used_bytes()
    }

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
        self.instance.reset_invocation();
    }
}
