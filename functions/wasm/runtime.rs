//! The WebAssembly runtime of every interpreted function (`wasm-*`
//! artifacts): `wasmi` (a `no_std` interpreter on stable Rust) embedding one
//! module. The root build script compiles each `functions/wasm/*.wat` to
//! WebAssembly on the host (the `wat` crate) and generates, per module, a
//! function crate holding this file, the module's bytes and a two-line
//! `lib.rs`; `microfaas build` builds it like any other function (unsafe
//! code forbidden, allowlisted crates only, no new imports).
//!
//! The same file also builds `wasm-runtime`, the runtime alone: it embeds no
//! module and takes one at deploy time through the SDK's `load` (a module
//! is then data, not code: one runtime artifact serves every function).
//!
//! # The levels
//! * `init` (the base level: what a runtime base snapshot captures on
//!   `vm`): the engine and the linker with the host functions;
//! * `load` (the function level: what a function snapshot captures on `vm`,
//!   and the post-init snapshot on `language`): the module parsed,
//!   validated and compiled eagerly (every function body to wasmi
//!   bytecode), then instantiated once, its start function run, to check
//!   that it links and starts. An embedded `wasm-NAME` crate runs both in
//!   its `init`.
//! * `handle`: a fresh instance of the compiled module (its memory, globals
//!   and tables; its start function runs), then one call of its `handle`
//!   export. `checkpoint()` is a host function, so an argument snapshot
//!   stops the instance mid-module.
//!
//! # The module's ABI (imports from module `microfaas`)
//! * `input_len() -> i32`; `input_read(dst, offset, len)` copies input bytes
//!   into linear memory; `output_write(src, len)` appends to the output;
//! * `clock_ns() -> i64`, `checkpoint()`;
//! * `fail(ptr, len)`: the request fails with that UTF-8 message
//!   (`FunctionFailed`, as a native `handle` returning `Err`).
//!
//! Exports: `memory` and `handle: [] -> []`.
//!
//! # Faults
//! A module that is not valid WebAssembly, or that does not link or whose
//! start function traps, fails `init` (`InitFailed`); a trap in a request is
//! a panic (`Panicked`); linear memory the heap limit refuses is
//! `OutOfMemory`; a loop that never ends is stopped by the invocation budget
//! like a native one (`BudgetExceeded`).
//!
//! # Why an instance per request
//! Runtimes reclaim the heap a request allocates when it ends, and may
//! abandon a request mid-call (budget, fault): state a request touches must
//! not outlive it. So what `init` builds (engine, linker, compiled module)
//! is never written after `init`, and every request gets its own instance,
//! allocated on its own heap (as Fastly's Compute and Lucet do): no state
//! leaks from one request to the next, and a request abandoned mid-call
//! leaves nothing half-updated behind. wasmi keeps no value stacks cached
//! between calls for the same reason.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use microfaas_sdk::Error;
use microfaas_sdk::OnceBox;
use wasmi::errors::{MemoryError, TableError};
use wasmi::{Caller, CompilationMode, Config, Engine, Extern, Linker, Memory, Module, Store, TypedFunc};
use wasmi_core::{LimiterError, ResourceLimiter};

/// The import module name of the host functions.
const HOST_MODULE: &str = "microfaas";

/// What the interpreter ran into while growing memories and tables (the
/// heap limit bounds them; nothing else does).
#[derive(Debug, Default)]
struct Limits {
    /// A memory or table could not be grown because the heap refused.
    out_of_memory: bool,
}

impl ResourceLimiter for Limits {
    fn memory_growing(&mut self, _current: usize, _desired: usize, _max: Option<usize>) -> Result<bool, LimiterError> {
        Ok(true)
    }

    fn table_growing(&mut self, _current: usize, _desired: usize, _max: Option<usize>) -> Result<bool, LimiterError> {
        Ok(true)
    }

    fn memory_grow_failed(&mut self, error: &MemoryError) -> Result<(), LimiterError> {
        if matches!(error, MemoryError::OutOfSystemMemory) {
            self.out_of_memory = true;
            return Err(LimiterError::ResourceLimiterDeniedAllocation);
        }
        Ok(())
    }

    fn table_grow_failed(&mut self, error: &TableError) -> Result<(), LimiterError> {
        if matches!(error, TableError::OutOfSystemMemory) {
            self.out_of_memory = true;
            return Err(LimiterError::ResourceLimiterDeniedAllocation);
        }
        Ok(())
    }

    fn instances(&self) -> usize {
        1
    }

    fn tables(&self) -> usize {
        64
    }

    fn memories(&self) -> usize {
        1
    }
}

/// The store's data: the current request's input and output.
#[derive(Debug, Default)]
struct Host {
    limits: Limits,
    /// The request's input (empty outside a request).
    input: Vec<u8>,
    /// The request's output so far.
    output: Vec<u8>,
    /// The message the module passed to `fail`.
    failed: Option<String>,
    /// The instance's exported memory (set after instantiation).
    memory: Option<Memory>,
}

/// The runtime, made by `init`: the engine and the linker with the host
/// functions (the base level: no module yet).
struct Runtime {
    engine: Engine,
    linker: Linker<Host>,
}

/// The compiled module, made by `load`.
struct Prepared {
    runtime: &'static Runtime,
    module: Module,
}

/// Set once by `init`; read-only afterwards.
static RUNTIME: OnceBox<Runtime> = OnceBox::new();
/// Set once by `load`; read-only afterwards.
static PREPARED: OnceBox<Prepared> = OnceBox::new();

fn memory_of(caller: &Caller<'_, Host>) -> Result<Memory, wasmi::Error> {
    caller
        .data()
        .memory
        .ok_or_else(|| wasmi::Error::new("the module exports no `memory`"))
}

/// `[offset, offset + len)` as a range of a buffer of `size` bytes.
fn span(offset: u32, len: u32, size: usize) -> Result<core::ops::Range<usize>, wasmi::Error> {
    let start = usize::try_from(offset).map_err(|_| wasmi::Error::new("offset out of range"))?;
    let len = usize::try_from(len).map_err(|_| wasmi::Error::new("length out of range"))?;
    match start.checked_add(len) {
        Some(end) if end <= size => Ok(start..end),
        _ => Err(wasmi::Error::new(format!(
            "out of bounds: {len} bytes at {start} of a {size}-byte buffer"
        ))),
    }
}

fn linker(engine: &Engine) -> Result<Linker<Host>, wasmi::Error> {
    let mut linker = Linker::<Host>::new(engine);
    linker.func_wrap(HOST_MODULE, "input_len", |caller: Caller<'_, Host>| -> i32 {
        // The host bounds inputs far below 2 GiB.
        i32::try_from(caller.data().input.len()).unwrap_or(i32::MAX)
    })?;
    linker.func_wrap(
        HOST_MODULE,
        "input_read",
        |mut caller: Caller<'_, Host>, dst: u32, offset: u32, len: u32| -> Result<(), wasmi::Error> {
            let memory = memory_of(&caller)?;
            let (mem, host) = memory.data_and_store_mut(&mut caller);
            let from = span(offset, len, host.input.len())?;
            let to = span(dst, len, mem.len())?;
            mem[to].copy_from_slice(&host.input[from]);
            Ok(())
        },
    )?;
    linker.func_wrap(
        HOST_MODULE,
        "output_write",
        |mut caller: Caller<'_, Host>, src: u32, len: u32| -> Result<(), wasmi::Error> {
            let memory = memory_of(&caller)?;
            let (mem, host) = memory.data_and_store_mut(&mut caller);
            let from = span(src, len, mem.len())?;
            if host.output.try_reserve(from.len()).is_err() {
                host.limits.out_of_memory = true;
                return Err(wasmi::Error::new("output: allocation refused"));
            }
            host.output.extend_from_slice(&mem[from]);
            Ok(())
        },
    )?;
    linker.func_wrap(HOST_MODULE, "clock_ns", || -> i64 {
        i64::try_from(microfaas_sdk::clock_ns()).unwrap_or(i64::MAX)
    })?;
    linker.func_wrap(HOST_MODULE, "checkpoint", microfaas_sdk::checkpoint)?;
    linker.func_wrap(
        HOST_MODULE,
        "fail",
        |mut caller: Caller<'_, Host>, ptr: u32, len: u32| -> Result<(), wasmi::Error> {
            let memory = memory_of(&caller)?;
            let (mem, host) = memory.data_and_store_mut(&mut caller);
            let range = span(ptr, len, mem.len())?;
            let message = String::from_utf8_lossy(&mem[range]).into_owned();
            host.failed = Some(message);
            Err(wasmi::Error::new("the module called fail"))
        },
    )?;
    Ok(linker)
}

/// A fresh instance of the module over `input`, its start function run;
/// returns the store and its `handle` export.
fn instantiate(prepared: &Prepared, input: Vec<u8>) -> Result<(Store<Host>, TypedFunc<(), ()>), Fault> {
    let mut store = Store::new(
        &prepared.runtime.engine,
        Host {
            input,
            ..Host::default()
        },
    );
    store.limiter(|host| &mut host.limits);
    let instance = match prepared.runtime.linker.instantiate_and_start(&mut store, &prepared.module) {
        Ok(instance) => instance,
        Err(error) => return Err(Fault::of(&mut store, error)),
    };
    store.data_mut().memory = match instance.get_export(&store, "memory") {
        Some(Extern::Memory(memory)) => Some(memory),
        _ => {
            return Err(Fault::Invalid(
                "the wasm module exports no memory named `memory`".into(),
            ));
        }
    };
    let handle = instance
        .get_typed_func::<(), ()>(&store, "handle")
        .map_err(|e| Fault::Invalid(format!("the wasm module has no `handle: [] -> []` export: {e}")))?;
    Ok((store, handle))
}

/// Why running the module failed.
#[derive(Debug)]
enum Fault {
    /// The module is unusable (not valid, wrong exports).
    Invalid(String),
    /// It called `fail(message)`.
    Failed(String),
    /// Linear memory, a table or the output could not grow: the heap limit.
    OutOfMemory(String),
    /// A trap (or a host function refusing an out-of-bounds access).
    Trap(String),
}

impl Fault {
    fn of(store: &mut Store<Host>, error: wasmi::Error) -> Self {
        let host = store.data_mut();
        if let Some(message) = host.failed.take() {
            Fault::Failed(message)
        } else if host.limits.out_of_memory {
            Fault::OutOfMemory(format!("the heap limit refused wasm memory: {error}"))
        } else {
            Fault::Trap(format!("wasm trap: {error}"))
        }
    }

    /// Reports the fault as a native function's would be.
    fn report(self, during_init: bool) -> Error {
        match self {
            Fault::OutOfMemory(message) => microfaas_sdk::out_of_memory(&message),
            Fault::Trap(message) if !during_init => panic!("{message}"),
            Fault::Invalid(message) | Fault::Failed(message) | Fault::Trap(message) => Error::new(message),
        }
    }
}

/// The base level: makes the engine (eager compilation, no value stacks
/// cached between calls, custom page sizes) and the linker with the host
/// functions.
pub fn init() -> Result<(), Error> {
    let mut config = Config::default();
    config.compilation_mode(CompilationMode::Eager);
    config.set_max_cached_stacks(0);
    // Small memories (1-byte pages) for modules that need a few bytes.
    config.wasm_custom_page_sizes(true);
    let engine = Engine::new(&config);
    let linker = linker(&engine).map_err(|e| Error::new(format!("wasm runtime: {e}")))?;
    RUNTIME
        .set(alloc::boxed::Box::new(Runtime { engine, linker }))
        .map_err(|_| Error::new("the wasm runtime was initialised twice"))
}

/// The function level: parses, validates and compiles `module` (every
/// function body, eagerly) and instantiates it once, running its start
/// function, to check that it links and starts.
pub fn load(module: &[u8]) -> Result<(), Error> {
    let runtime = RUNTIME
        .get()
        .ok_or_else(|| Error::new("the wasm runtime is not initialised"))?;
    if PREPARED.get().is_some() {
        return Err(Error::new("a wasm module is already loaded"));
    }
    let module = Module::new(&runtime.engine, module).map_err(|e| Error::new(format!("invalid wasm module: {e}")))?;
    let prepared = Prepared { runtime, module };
    drop(instantiate(&prepared, Vec::new()).map_err(|f| f.report(true))?);
    PREPARED
        .set(alloc::boxed::Box::new(prepared))
        .map_err(|_| Error::new("a wasm module is already loaded"))
}

/// Both levels at once, for a crate that embeds its module.
#[allow(dead_code, reason = "wasm-runtime, which takes its module at deploy time, does not use it")]
pub fn init_with(module: &[u8]) -> Result<(), Error> {
    init()?;
    load(module)
}

/// One request: a fresh instance of the compiled module, its `handle`
/// export called once.
pub fn handle(input: &[u8]) -> Result<Vec<u8>, Error> {
    let prepared = PREPARED
        .get()
        .ok_or_else(|| Error::new("no wasm module is loaded (the function was deployed without one)"))?;
    let (mut store, handle) = instantiate(prepared, input.to_vec()).map_err(|f| f.report(false))?;
    match handle.call(&mut store, ()) {
        Ok(()) => Ok(core::mem::take(&mut store.data_mut().output)),
        Err(error) => Err(Fault::of(&mut store, error).report(false)),
    }
}
