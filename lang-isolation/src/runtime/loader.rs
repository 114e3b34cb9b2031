//! Our own loader for function artifacts (no `dlopen`, no filesystem): an
//! artifact arrives as a sealed memfd ([`SealedArtifact`]), is parsed and
//! checked once ([`ArtifactImage`], see [`super::elf`]) and can then be
//! mapped any number of times, each a fresh private copy ([`LoadedFunction`]).
//!
//! ```text
//!  reservation   one PROT_NONE anonymous mapping of the image span
//!  PT_LOAD R     MAP_PRIVATE|MAP_FIXED from the memfd, PROT_READ
//!  PT_LOAD R+X   MAP_PRIVATE|MAP_FIXED from the memfd, PROT_READ|PROT_EXEC
//!  PT_LOAD RW    MAP_PRIVATE|MAP_FIXED from the memfd, PROT_READ|PROT_WRITE;
//!                tail of the last file page zeroed; anonymous RW pages for
//!                the rest of the bss
//!  relocate      R_X86_64_RELATIVE, and GLOB_DAT/JUMP_SLOT/64 to this
//!                process's memcpy/memmove/memset/memcmp (bcmp = memcmp)
//!  PT_GNU_RELRO  mprotect(PROT_READ)
//! ```
//!
//! Every mapping is made with its final protection: nothing is ever both
//! writable and executable, no anonymous memory is ever executable, and no
//! `mprotect` adds `PROT_EXEC` — the seccomp rules of the sandboxed workers
//! and runners allow exactly this. The system calls a load makes:
//! `fcntl(F_GET_SEALS)`, `lseek`, `pread64` (parsing, once per artifact),
//! `mmap`, `mprotect(PROT_READ)` and `munmap` (every load / unload).
//!
//! A loaded image takes one mapping per segment (4 for the builder's
//! artifacts: R, R+X, RELRO-then-R, RW), plus one when a writable segment
//! has both file and bss pages and one when RELRO covers only part of its
//! segment (see [`super::elf::LoadPlan::max_mappings`]).

use super::elf::{self, ElfError, Import, LoadPlan, Protection, RelocValue};
use super::mmap::Mapping;
use microfaas_sdk::{HandleFn, InitFn, LoadFn};
use std::ffi::CString;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// The seals a delivered artifact memfd must carry: its contents and size
/// can never change, and no seal can be removed.
pub const REQUIRED_SEALS: libc::c_int =
    libc::F_SEAL_WRITE | libc::F_SEAL_GROW | libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL;
/// Largest artifact accepted: 64 MiB.
pub const MAX_ARTIFACT_BYTES: usize = 64 << 20;

/// Why an artifact could not be created, parsed or loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// Creating or sealing the memfd failed (host side).
    #[error("cannot create the sealed artifact memfd")]
    Create(#[source] io::Error),
    /// The fd's seals cannot be read (it is not a memfd).
    #[error("the artifact fd is not a memfd")]
    NotMemfd(#[source] io::Error),
    /// The memfd lacks a required seal.
    #[error(
        "the artifact memfd is not sealed against writes, growth, shrinking and unsealing (seals {seals:#x}, need {REQUIRED_SEALS:#x})"
    )]
    NotSealed {
        /// The seals it has.
        seals: libc::c_int,
    },
    /// Reading the memfd failed.
    #[error("cannot read the artifact")]
    Read(#[source] io::Error),
    /// Over [`MAX_ARTIFACT_BYTES`].
    #[error("the artifact is {len} bytes, more than the limit of {MAX_ARTIFACT_BYTES}")]
    TooLarge {
        /// Its size.
        len: u64,
    },
    /// The bytes are not a loadable artifact.
    #[error("refused the artifact")]
    Elf(#[source] ElfError),
    /// A mapping or protection change failed.
    #[error("cannot map the artifact image")]
    Map(#[source] io::Error),
}

static NEXT_ARTIFACT_ID: AtomicU64 = AtomicU64::new(1);

/// An artifact's bytes in a memfd sealed with [`REQUIRED_SEALS`]: created by
/// the host from bytes it verified, or received by a worker or runner, which
/// checks the seals. Closed on drop.
#[derive(Debug)]
pub struct SealedArtifact {
    file: File,
    len: u64,
    id: u64,
    label: String,
}

impl SealedArtifact {
    /// Creates a sealed memfd holding `bytes` (close-on-exec). `label` names
    /// the artifact in messages (and, shortened, the memfd).
    pub fn create(label: &str, bytes: &[u8]) -> Result<Self, LoadError> {
        if bytes.len() > MAX_ARTIFACT_BYTES {
            return Err(LoadError::TooLarge {
                len: u64::try_from(bytes.len()).unwrap_or(u64::MAX),
            });
        }
        // The memfd name keeps the label's end (a path's file name).
        let chars: Vec<char> = label.chars().filter(|&c| c != '\0').collect();
        let cname: String = chars[chars.len().saturating_sub(200)..].iter().collect();
        let cname =
            CString::new(format!("microfaas-artifact:{cname}")).map_err(|e| LoadError::Create(io::Error::other(e)))?;
        let fd = memfd_exec(&cname).map_err(LoadError::Create)?;
        let mut file = File::from(fd);
        file.write_all(bytes).map_err(LoadError::Create)?;
        // SAFETY: F_ADD_SEALS on our own memfd takes an integer argument.
        if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, REQUIRED_SEALS) } != 0 {
            return Err(LoadError::Create(io::Error::last_os_error()));
        }
        let mut sealed = Self::from_fd(OwnedFd::from(file))?;
        sealed.label = label.to_owned();
        Ok(sealed)
    }

    /// Takes ownership of a received fd, checking it is a memfd with
    /// [`REQUIRED_SEALS`] and not over [`MAX_ARTIFACT_BYTES`].
    pub fn from_fd(fd: OwnedFd) -> Result<Self, LoadError> {
        // SAFETY: F_GET_SEALS takes no argument and only reads the fd's state.
        let seals = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) };
        if seals < 0 {
            return Err(LoadError::NotMemfd(io::Error::last_os_error()));
        }
        if seals & REQUIRED_SEALS != REQUIRED_SEALS {
            return Err(LoadError::NotSealed { seals });
        }
        // SAFETY: lseek on an fd we own; it only moves its file offset (which
        // nothing uses: reads are positioned).
        let end = unsafe { libc::lseek(fd.as_raw_fd(), 0, libc::SEEK_END) };
        let len = u64::try_from(end).map_err(|_| LoadError::Read(io::Error::last_os_error()))?;
        if len > u64::try_from(MAX_ARTIFACT_BYTES).unwrap_or(u64::MAX) {
            return Err(LoadError::TooLarge { len });
        }
        let label = format!("artifact memfd (fd {})", fd.as_raw_fd());
        Ok(Self {
            file: File::from(fd),
            len,
            id: NEXT_ARTIFACT_ID.fetch_add(1, Ordering::Relaxed),
            label,
        })
    }

    /// What it was created from (the host's artifact path), or its fd.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// Bytes in the memfd.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether it holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// An id unique among the artifacts of this process (functions deployed
    /// from one `SealedArtifact` share one image in a worker).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// All its bytes (positioned reads: the memfd's offset is not used).
    pub fn read_all(&self) -> Result<Vec<u8>, LoadError> {
        let len = usize::try_from(self.len).map_err(|_| LoadError::TooLarge { len: self.len })?;
        let mut bytes = vec![0u8; len];
        self.file.read_exact_at(&mut bytes, 0).map_err(LoadError::Read)?;
        Ok(bytes)
    }
}

impl AsFd for SealedArtifact {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

/// What a function runs: its artifact and, for a function deployed with a
/// module (deploy-time data such as the WebAssembly module an interpreter
/// runs), that module, both sealed memfds. The module is passed to the
/// artifact's `microfaas_v1_load` once, right after `init`; the pair is one
/// image (loaded, initialised and snapshotted as one), never shared with
/// the artifact alone or with another module.
#[derive(Debug, Clone)]
pub struct FunctionCode {
    artifact: Arc<SealedArtifact>,
    module: Option<Arc<SealedArtifact>>,
    image: u64,
}

impl FunctionCode {
    /// The artifact alone: its image is the artifact's ([`SealedArtifact::id`]).
    pub fn new(artifact: Arc<SealedArtifact>) -> Self {
        let image = artifact.id();
        Self {
            artifact,
            module: None,
            image,
        }
    }

    /// `artifact` taking `module`: an image of its own (a fresh id, from the
    /// same counter as the artifacts', so unique in this process).
    pub fn with_module(artifact: Arc<SealedArtifact>, module: Arc<SealedArtifact>) -> Self {
        Self {
            artifact,
            module: Some(module),
            image: NEXT_ARTIFACT_ID.fetch_add(1, Ordering::Relaxed),
        }
    }

    /// The artifact.
    pub fn artifact(&self) -> &Arc<SealedArtifact> {
        &self.artifact
    }

    /// The module, if any.
    pub fn module(&self) -> Option<&Arc<SealedArtifact>> {
        self.module.as_ref()
    }

    /// The image id: functions deployed with equal ids share one loaded
    /// (and initialised) image in a worker.
    pub fn image_id(&self) -> u64 {
        self.image
    }
}

/// The non-executable ranges of `plan`'s image with their final protection
/// (RELRO read-only inside its writable segment). Pure.
pub(crate) fn data_ranges(plan: &LoadPlan) -> Vec<(usize, usize, libc::c_int)> {
    let mut out = Vec::new();
    for seg in plan.segments.iter().filter(|s| s.protection != Protection::ReadExec) {
        let (start, end) = (seg.start, seg.end());
        if end <= start {
            continue;
        }
        let prot = prot_of(seg.protection);
        match plan.relro {
            Some((off, len)) if seg.protection == Protection::ReadWrite && off >= start && off + len <= end => {
                for (a, b, p) in [
                    (start, off, prot),
                    (off, off + len, libc::PROT_READ),
                    (off + len, end, prot),
                ] {
                    if b > a {
                        out.push((a, b - a, p));
                    }
                }
            }
            _ => out.push((start, end - start, prot)),
        }
    }
    out
}

/// `memfd_create` with `MFD_EXEC` (so that `vm.memfd_noexec` cannot make it
/// unmappable as code), falling back to no flag on kernels before 6.3.
fn memfd_exec(name: &CString) -> io::Result<OwnedFd> {
    let base = libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING;
    for flags in [base | libc::MFD_EXEC, base] {
        // SAFETY: a NUL-terminated name and valid flags; the fd is owned below.
        let raw = unsafe { libc::memfd_create(name.as_ptr(), flags) };
        if raw >= 0 {
            // SAFETY: `raw` is a fresh fd nothing else owns.
            return Ok(unsafe { OwnedFd::from_raw_fd(raw) });
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EINVAL) {
            return Err(err);
        }
    }
    Err(io::Error::from_raw_os_error(libc::EINVAL))
}

/// A sealed artifact parsed and checked into a [`LoadPlan`]: ready to be
/// mapped any number of times without reading or parsing it again.
#[derive(Debug)]
pub struct ArtifactImage {
    sealed: SealedArtifact,
    plan: LoadPlan,
    /// The module every instance's `load` is given (see [`FunctionCode`]).
    module: Option<Arc<[u8]>>,
}

impl ArtifactImage {
    /// Reads and checks `sealed` (see [`super::elf`] for what is accepted).
    pub fn parse(sealed: SealedArtifact) -> Result<Self, LoadError> {
        let bytes = sealed.read_all()?;
        let plan = elf::plan(&bytes).map_err(LoadError::Elf)?;
        Ok(Self {
            sealed,
            plan,
            module: None,
        })
    }

    /// The image of this artifact taking `module`: its bytes are read now
    /// (the memfd is closed) and given to every instance's `load` right
    /// after `init`. An artifact that exports no `microfaas_v1_load` is
    /// refused when an instance is initialised, not here (the error is the
    /// function's: it takes no module).
    pub fn with_module(mut self, module: SealedArtifact) -> Result<Self, LoadError> {
        self.module = Some(module.read_all()?.into());
        Ok(self)
    }

    /// The module, if the image takes one.
    pub fn module(&self) -> Option<&Arc<[u8]>> {
        self.module.as_ref()
    }

    /// The checked plan.
    pub fn plan(&self) -> &LoadPlan {
        &self.plan
    }

    /// The memfd.
    pub fn sealed(&self) -> &SealedArtifact {
        &self.sealed
    }
}

pub(crate) fn prot_of(p: Protection) -> libc::c_int {
    match p {
        Protection::Read => libc::PROT_READ,
        Protection::ReadExec => libc::PROT_READ | libc::PROT_EXEC,
        Protection::ReadWrite => libc::PROT_READ | libc::PROT_WRITE,
    }
}

pub(crate) fn import_addr(import: Import) -> u64 {
    if super::pkeys::key_safe_imports() {
        // glibc's read libc globals (key 0): see `super::memfns`.
        let [memcpy, memmove, memset, memcmp] = super::memfns::addresses();
        let f = match import {
            Import::Memcpy => memcpy,
            Import::Memmove => memmove,
            Import::Memset => memset,
            Import::Memcmp | Import::Bcmp => memcmp,
        };
        return u64::try_from(f).unwrap_or(0);
    }
    let f: *const () = match import {
        Import::Memcpy => libc::memcpy as *const (),
        Import::Memmove => libc::memmove as *const (),
        Import::Memset => libc::memset as *const (),
        Import::Memcmp | Import::Bcmp => libc::memcmp as *const (),
    };
    u64::try_from(f.addr()).unwrap_or(0)
}

/// A mapped, relocated private copy of an artifact and its entry points.
/// The image is unmapped (and the entry pointers invalid) when this value
/// is dropped.
#[derive(Debug)]
pub struct LoadedFunction {
    init: InitFn,
    handle: HandleFn,
    /// `microfaas_v1_load`, if exported.
    load: Option<LoadFn>,
    /// The module `load` is given after `init` (from the [`ArtifactImage`]).
    module: Option<Arc<[u8]>>,
    mappings: usize,
    /// The non-executable ranges of the image (offset, length, final
    /// protection): what a protection key covers.
    data_ranges: Vec<(usize, usize, libc::c_int)>,
    // Last: unmapped after the pointers above are gone.
    image: ImageMemory,
}

/// Where a loaded image's pages are.
#[derive(Debug)]
enum ImageMemory {
    /// A private copy this value maps and unmaps.
    Owned(Mapping),
    /// A pre-linked image mapped in its range of an image space
    /// ([`super::prelinked::ImageSpace`]), which keeps it mapped while the
    /// token lives (it refuses to map anything until then).
    Window {
        addr: usize,
        len: usize,
        _token: std::sync::Arc<()>,
    },
}

impl ImageMemory {
    fn addr(&self) -> usize {
        match self {
            Self::Owned(m) => m.addr(),
            Self::Window { addr, .. } => *addr,
        }
    }

    fn start(&self) -> *const u8 {
        match self {
            Self::Owned(m) => m.start().cast_const(),
            // The window's reservation exposed its provenance when mapped.
            Self::Window { addr, .. } => std::ptr::with_exposed_provenance(*addr),
        }
    }

    fn len(&self) -> usize {
        match self {
            Self::Owned(m) => m.len(),
            Self::Window { len, .. } => *len,
        }
    }
}

impl LoadedFunction {
    /// Maps a fresh private copy of `artifact` and relocates it. Its statics
    /// are as built, whatever other copies did to theirs.
    pub fn load(artifact: &ArtifactImage) -> Result<Self, LoadError> {
        let plan = &artifact.plan;
        let image = Mapping::anonymous(plan.span, libc::PROT_NONE).map_err(LoadError::Map)?;
        let fd = artifact.sealed.as_fd();
        for seg in &plan.segments {
            let prot = prot_of(seg.protection);
            if seg.file_bytes > 0 {
                image
                    .map_file_fixed(seg.start, seg.file_bytes, prot, fd, seg.file_offset)
                    .map_err(LoadError::Map)?;
            }
            if let Some(from) = seg.zero_from {
                let end = seg.start + seg.file_bytes;
                // SAFETY: the plan puts `[from, end)` inside this writable
                // segment's last file page, just mapped read-write and private
                // to this process; no Rust reference points into the image.
                unsafe { std::ptr::write_bytes(image.start().add(from), 0, end - from) };
            }
            if seg.anon_bytes > 0 {
                image
                    .map_anonymous_fixed(seg.start + seg.file_bytes, seg.anon_bytes, prot)
                    .map_err(LoadError::Map)?;
            }
        }
        let lo = usize::try_from(plan.lo).map_err(|_| LoadError::Map(io::Error::other("image base")))?;
        let base0 = u64::try_from(image.addr().wrapping_sub(lo)).unwrap_or(0);
        for r in &plan.relocations {
            let value = match r.value {
                RelocValue::Relative(addend) => base0.wrapping_add(addend),
                RelocValue::Import(import, addend) => import_addr(import).wrapping_add(addend),
            };
            // SAFETY: the plan puts every relocation's 8 bytes inside a
            // writable segment of the image, mapped read-write above; the
            // write may be unaligned.
            unsafe { image.start().add(r.offset).cast::<u64>().write_unaligned(value) };
        }
        if let Some((offset, len)) = plan.relro {
            image.protect(offset, len, libc::PROT_READ).map_err(LoadError::Map)?;
        }
        // SAFETY: the image was mapped and relocated above by the plan, and
        // `self` keeps it mapped (dropping it last).
        let mut function = unsafe { Self::over(plan, ImageMemory::Owned(image)) };
        function.module = artifact.module.clone();
        Ok(function)
    }

    /// The function of a pre-linked image mapped at `addr` (`plan.span`
    /// bytes) in an image space, which keeps it mapped while `token` lives.
    ///
    /// The instance's `load` is given `artifact`'s module, if it has one.
    ///
    /// # Safety
    /// `[addr, addr + plan.span)` must hold `plan`'s image relocated for
    /// `addr` and stay mapped so while the token (kept in the value) lives.
    pub(crate) unsafe fn in_window(artifact: &ArtifactImage, addr: usize, token: std::sync::Arc<()>) -> Self {
        let plan = artifact.plan();
        let memory = ImageMemory::Window {
            addr,
            len: plan.span,
            _token: token,
        };
        // SAFETY: forwarded caller contract.
        let mut function = unsafe { Self::over(plan, memory) };
        function.module = artifact.module.clone();
        function
    }

    /// # Safety
    /// `image` must hold `plan`'s image, mapped and relocated for its
    /// address, for as long as it lives.
    unsafe fn over(plan: &LoadPlan, image: ImageMemory) -> Self {
        let base = image.start();
        // SAFETY: the plan puts the entry symbols (and `load`, if any) inside an executable
        // segment of the image (caller contract: mapped); the ABI (version
        // checked by the plan) gives them these types. They stay valid
        // while `image` is mapped, which `self` guarantees by dropping
        // `image` last.
        let (init, handle, load) = unsafe {
            (
                std::mem::transmute::<*const u8, InitFn>(base.add(plan.init)),
                std::mem::transmute::<*const u8, HandleFn>(base.add(plan.handle)),
                plan.load
                    .map(|at| std::mem::transmute::<*const u8, LoadFn>(base.add(at))),
            )
        };
        Self {
            init,
            handle,
            load,
            module: None,
            mappings: plan.max_mappings(),
            data_ranges: data_ranges(plan),
            image,
        }
    }

    /// Gives every non-executable page of the image (rodata, RELRO/GOT,
    /// data, bss) protection key `key`, keeping its protection. Code keeps
    /// key 0: PKU does not restrict instruction fetch, and no function reads
    /// its own code as data.
    pub fn set_key(&self, key: u32) -> Result<(), LoadError> {
        for &(offset, len, prot) in &self.data_ranges {
            // SAFETY: a range of the image this value owns, with the
            // protection it already has; only its key changes.
            unsafe { super::pkeys::pkey_mprotect(self.image.addr() + offset, len, prot, key) }
                .map_err(LoadError::Map)?;
        }
        Ok(())
    }

    /// Address of the image's first page.
    pub fn base(&self) -> usize {
        self.image.addr()
    }

    /// Bytes of address space the image spans.
    pub fn span(&self) -> usize {
        self.image.len()
    }

    /// Upper bound of the kernel mappings (VMAs) the image takes.
    pub fn mappings(&self) -> usize {
        self.mappings
    }

    /// The init entry point (valid while `self` lives).
    pub(crate) fn init_fn(&self) -> InitFn {
        self.init
    }

    /// The handle entry point (valid while `self` lives).
    pub(crate) fn handle_fn(&self) -> HandleFn {
        self.handle
    }

    /// The load entry point, if exported (valid while `self` lives).
    pub(crate) fn load_fn(&self) -> Option<LoadFn> {
        self.load
    }

    /// The module `init` goes on to give `load`, if any.
    pub fn module(&self) -> Option<&Arc<[u8]>> {
        self.module.as_ref()
    }
}
