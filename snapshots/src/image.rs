//! Merged images: a node's full guest memory (base + its chain of deltas,
//! newest wins) built once into a sparse file in `images/`, validated
//! against the lineage it was built from, and shared (`Arc`) by every
//! instance started from the node.

use crate::delta::{self, ChainNode};
use crate::error::{ImageError, NodeFileError};
use crate::id::NodeId;
use crate::node::{self, Node};
use crate::pages::{self, PAGE_SIZE, PAGE_SIZE_U64, PageRange};
use crate::store::{Store, now_unix_ms};
use serde::{Deserialize, Serialize};
use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError};
use std::time::Instant;

/// Version of the image metadata; a mismatch just means "rebuild".
pub const IMAGE_FORMAT_VERSION: u32 = 1;
/// Largest image metadata file read.
const IMAGE_META_MAX_BYTES: u64 = 64 << 20;
/// Pages read from a node per `pread` while building.
const BUILD_CHUNK_PAGES: usize = 256;

/// One node of the lineage an image was built from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainLink {
    /// The node.
    pub id: NodeId,
    /// Its header checksum (covers its page index, so its content).
    pub header_crc: u64,
}

/// The metadata file (`images/ID.json`) beside a merged image.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageMeta {
    /// [`IMAGE_FORMAT_VERSION`].
    pub format_version: u32,
    /// The node the image is of.
    pub node: NodeId,
    /// Image size in bytes.
    pub guest_mem_bytes: u64,
    /// The lineage it was built from, base first.
    pub chain: Vec<ChainLink>,
    /// Pages some node of the lineage stores.
    pub present: Vec<PageRange>,
    /// Pages that are not all zero (the rest are holes in the file).
    pub nonzero: Vec<PageRange>,
    /// When it was built, ms since the epoch.
    pub built_unix_ms: u64,
    /// How long building took, in microseconds.
    pub build_us: u64,
    /// The kernel boot the image was built in (`/proc/sys/kernel/random/boot_id`).
    /// Images are not fsynced: a process crash keeps the page cache, and an
    /// image from another boot (which may have lost unwritten pages) is
    /// rebuilt.
    pub boot_id: String,
}

/// This kernel boot's id (empty if unknown, which never matches a cache).
fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// A node's merged image, open read-only. Map it with
/// [`MergedImage::map`].
#[derive(Debug)]
pub struct MergedImage {
    pub(crate) path: PathBuf,
    pub(crate) file: File,
    pub(crate) meta: ImageMeta,
    pub(crate) built_now: bool,
}

impl MergedImage {
    /// The node it is of.
    pub fn node_id(&self) -> NodeId {
        self.meta.node
    }
    /// The image file.
    pub fn path(&self) -> &Path {
        &self.path
    }
    /// Size in bytes (the guest's memory).
    pub fn guest_mem_bytes(&self) -> u64 {
        self.meta.guest_mem_bytes
    }
    /// Its metadata: lineage, present and non-zero pages, build time.
    pub fn meta(&self) -> &ImageMeta {
        &self.meta
    }
    /// Pages that some node of the lineage stores, without reading the image.
    pub fn present_ranges(&self) -> &[PageRange] {
        &self.meta.present
    }
    /// Pages that are not all zero, without reading the image.
    pub fn nonzero_ranges(&self) -> &[PageRange] {
        &self.meta.nonzero
    }
    /// Whether this process built it (rather than finding a valid cache file).
    pub fn was_built(&self) -> bool {
        self.built_now
    }
    /// Reads `buf.len()` bytes of guest memory at guest-physical `gpa` from
    /// the (checked) image, e.g. to check a saved state against it before
    /// any instance runs.
    pub fn read_at(&self, gpa: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.file.read_exact_at(buf, gpa)
    }
}

fn links(chain: &[Arc<Node>]) -> Vec<ChainLink> {
    chain
        .iter()
        .map(|n| ChainLink {
            id: n.id(),
            header_crc: n.header_crc(),
        })
        .collect()
}

impl Store {
    /// The merged image of node `id`, for starting instances: from this
    /// process's cache, else from the store's cache file if it was built
    /// from exactly this lineage, else built now from the lineage (every
    /// page it takes is checksummed first; a corrupt node refuses the build
    /// and nothing is cached or mapped). Also records `id` as used.
    pub fn image(&self, id: NodeId) -> Result<Arc<MergedImage>, ImageError> {
        let chain = self.lineage(id)?;
        let want = links(&chain);
        let _ = self.touch(id);
        let in_process = || {
            let images = self.inner.images.lock().unwrap_or_else(PoisonError::into_inner);
            images.get(&id).filter(|img| img.meta.chain == want).map(Arc::clone)
        };
        if let Some(img) = in_process() {
            return Ok(img);
        }
        // One build at a time in this process; whoever waited finds the
        // image the previous build made.
        let _building = self.inner.build_lock.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(img) = in_process() {
            return Ok(img);
        }
        let img = match self.cached_image(id, &want) {
            Some(img) => match self.check_cached(img, &chain) {
                Some(img) => img,
                None => self.build_image(&chain)?,
            },
            None => self.build_image(&chain)?,
        };
        let img = Arc::new(img);
        self.inner
            .images
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id, Arc::clone(&img));
        Ok(img)
    }

    /// The metadata of node `id`'s cached image if the cache file exists and
    /// matches the node's current lineage.
    pub fn image_meta(&self, id: NodeId) -> Option<ImageMeta> {
        let want = links(&self.lineage(id).ok()?);
        self.cached_image(id, &want).map(|img| img.meta)
    }

    /// Checks a cached image's content against its lineage before this
    /// process first maps it (every page must carry the keyed tag the
    /// lineage's MAC-checked index records, holes must be zero pages); its
    /// `present` and `nonzero` ranges are then recomputed from the lineage
    /// and the check rather than taken from the unauthenticated JSON. A
    /// failing image is refused (recorded, named), its cache files removed,
    /// and `None` returned so the caller re-merges it.
    ///
    /// The result is cached as the open, checked descriptor itself (the
    /// `Arc<MergedImage>` this process keeps): every mapping is made from
    /// that descriptor, so a file renamed over the image later is never
    /// seen. Writes to the checked inode itself would still reach private
    /// mappings' unwritten pages; the file is mode 0444 in a directory of
    /// the host's uid, which no function sandbox can reach (another uid, no
    /// file system), so only the host's uid can make them — and it holds the
    /// key anyway.
    fn check_cached(&self, mut img: MergedImage, chain: &[Arc<Node>]) -> Option<MergedImage> {
        let path = img.path.clone();
        match verify_image(&img, chain) {
            Ok(check) if check.bad.is_empty() => {
                let nodes = chain_nodes(chain);
                img.meta.present = pages::ranges_from_sorted(delta::effective(&nodes).iter().map(|(p, _)| *p));
                img.meta.nonzero = pages::ranges_from_sorted(check.nonzero);
                Some(img)
            }
            Ok(check) => {
                self.refuse(
                    &path,
                    &ImageError::Unauthenticated {
                        path: path.clone(),
                        pages: check.bad.len(),
                    },
                );
                let _ = self.remove_image(img.meta.node);
                None
            }
            Err(e) => {
                self.refuse(&path, &e);
                let _ = self.remove_image(img.meta.node);
                None
            }
        }
    }

    fn cached_image(&self, id: NodeId, want: &[ChainLink]) -> Option<MergedImage> {
        let meta_path = self.image_meta_path(id);
        let f = File::open(&meta_path).ok()?;
        if f.metadata().ok()?.len() > IMAGE_META_MAX_BYTES {
            return None;
        }
        let meta: ImageMeta = serde_json::from_reader(std::io::BufReader::new(f)).ok()?;
        if meta.format_version != IMAGE_FORMAT_VERSION
            || meta.node != id
            || meta.chain != want
            || meta.boot_id.is_empty()
            || meta.boot_id != boot_id()
        {
            return None;
        }
        let path = self.image_path(id);
        let file = File::open(&path).ok()?;
        (file.metadata().ok()?.len() == meta.guest_mem_bytes).then_some(MergedImage {
            path,
            file,
            meta,
            built_now: false,
        })
    }

    /// Drops node `id`'s merged image cache (files and this process's entry).
    /// Instances already mapping it keep their mapping.
    pub fn remove_image(&self, id: NodeId) -> std::io::Result<()> {
        self.inner
            .images
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&id);
        for p in [self.image_meta_path(id), self.image_path(id)] {
            match fs::remove_file(&p) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        Ok(())
    }

    fn build_image(&self, chain: &[Arc<Node>]) -> Result<MergedImage, ImageError> {
        let started = Instant::now();
        let last = chain.last().unwrap_or_else(|| unreachable!("a lineage is never empty"));
        let id = last.id();
        let guest_mem_bytes = last.guest_mem_bytes();
        // Temp files live beside the images: the renames stay on one file
        // system even when the images directory is a tmpfs.
        let dir = self.images_dir().to_owned();
        let tmp = self.temp_in(&dir, &format!("{id}.img"));
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| ImageError::Io { path, source }
        };
        let out = File::options()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(io(&tmp))?;
        // From here on the temp file must go on any failure.
        let built = (|| {
            out.set_len(guest_mem_bytes).map_err(io(&tmp))?;
            let nodes: Vec<ChainNode<'_>> = chain
                .iter()
                .map(|n| ChainNode {
                    id: n.id(),
                    index: n.index(),
                })
                .collect();
            let effective = delta::effective(&nodes);
            let mut per_node = vec![Vec::new(); chain.len()];
            for (_, src) in &effective {
                per_node[src.depth].push(src.slot);
            }
            let mut nonzero = Vec::new();
            let mut buf = vec![0u8; BUILD_CHUNK_PAGES * PAGE_SIZE];
            for (node, slots) in chain.iter().zip(&per_node) {
                if slots.is_empty() {
                    continue;
                }
                let file = node::open(node.path()).map_err(ImageError::Corrupt)?;
                for run in delta::slot_runs(slots, BUILD_CHUNK_PAGES) {
                    let bytes = &mut buf[..run.len() * PAGE_SIZE];
                    node.read_slots(&file, run.clone(), bytes)
                        .map_err(ImageError::Corrupt)?;
                    write_pages(&out, &node.index()[run], bytes, &mut nonzero).map_err(io(&tmp))?;
                }
            }
            nonzero.sort_unstable();
            fs::set_permissions(&tmp, fs::Permissions::from_mode(0o444)).map_err(io(&tmp))?;
            Ok::<_, ImageError>(ImageMeta {
                format_version: IMAGE_FORMAT_VERSION,
                node: id,
                guest_mem_bytes,
                chain: links(chain),
                present: pages::ranges_from_sorted(effective.iter().map(|(p, _)| *p)),
                nonzero: pages::ranges_from_sorted(nonzero),
                built_unix_ms: now_unix_ms(),
                build_us: 0,
                boot_id: boot_id(),
            })
        })();
        let mut meta = match built {
            Ok(m) => m,
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                return Err(e);
            }
        };
        drop(out);
        // The metadata file is the commit mark: drop any old one first, so a
        // crash between the two renames leaves an image without metadata,
        // which is rebuilt.
        let meta_path = self.image_meta_path(id);
        let path = self.image_path(id);
        match fs::remove_file(&meta_path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(&meta_path)(e)),
            _ => {}
        }
        fs::rename(&tmp, &path).map_err(io(&path))?;
        meta.build_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        let meta_tmp = self.temp_in(&dir, &format!("{id}.json"));
        (|| {
            let mut f = File::create(&meta_tmp)?;
            serde_json::to_writer(&mut f, &meta)?;
            f.flush()?;
            fs::rename(&meta_tmp, &meta_path)
        })()
        .map_err(|e| {
            let _ = fs::remove_file(&meta_tmp);
            io(&meta_path)(e)
        })?;
        let file = File::open(&path).map_err(io(&path))?;
        Ok(MergedImage {
            path,
            file,
            meta,
            built_now: true,
        })
    }
}

/// Writes the non-zero pages of `bytes` (pages `entries`, in order) to their
/// guest-physical offsets, one `pwrite` per run of consecutive pages; zero
/// pages stay holes.
fn write_pages(
    out: &File,
    entries: &[crate::format::IndexEntry],
    bytes: &[u8],
    nonzero: &mut Vec<u64>,
) -> std::io::Result<()> {
    let mut run: Option<(u64, usize, usize)> = None; // (first page, byte start, byte end)
    let flush = |run: Option<(u64, usize, usize)>| -> std::io::Result<()> {
        if let Some((page, s, e)) = run {
            out.write_all_at(&bytes[s..e], page.saturating_mul(PAGE_SIZE_U64))?;
        }
        Ok(())
    };
    for (i, (entry, page)) in entries.iter().zip(bytes.chunks_exact(PAGE_SIZE)).enumerate() {
        if pages::is_zero(page) {
            flush(run.take())?;
            continue;
        }
        nonzero.push(entry.page);
        let start = i * PAGE_SIZE;
        run = match run {
            Some((first, s, e)) if e == start && first + ((e - s) / PAGE_SIZE) as u64 == entry.page => {
                Some((first, s, start + PAGE_SIZE))
            }
            other => {
                flush(other)?;
                Some((entry.page, start, start + PAGE_SIZE))
            }
        };
    }
    flush(run)
}

fn chain_nodes(chain: &[Arc<Node>]) -> Vec<ChainNode<'_>> {
    chain
        .iter()
        .map(|n| ChainNode {
            id: n.id(),
            index: n.index(),
        })
        .collect()
}

/// What checking an image against its lineage found.
#[derive(Debug, Default)]
pub(crate) struct ImageCheck {
    /// Pages whose content differs from what the lineage records.
    pub(crate) bad: Vec<u64>,
    /// Pages that are not all zero, ascending.
    pub(crate) nonzero: Vec<u64>,
}

/// The runs of pages of `file` (of `len` bytes) that hold data, from
/// `SEEK_DATA`/`SEEK_HOLE` (`ipc::holes`; a file system that cannot tell
/// reports one run: everything). Pages outside them read as zero.
fn data_runs(file: &File, len: u64) -> std::io::Result<Vec<PageRange>> {
    use std::os::fd::AsFd;
    Ok(ipc::holes::data_runs(file.as_fd(), 0..len, PAGE_SIZE_U64)?
        .into_iter()
        .map(|r| PageRange {
            start: r.start / PAGE_SIZE_U64,
            end: r.end.div_ceil(PAGE_SIZE_U64),
        })
        .collect())
}

/// Checks an image against its lineage: each page must carry the keyed tag
/// of the page the lineage's (MAC-checked) indexes say it holds; a page no
/// node stores must be zero. Holes are zero by definition, so only the
/// file's data runs are read and hashed.
pub(crate) fn verify_image(img: &MergedImage, chain: &[Arc<Node>]) -> Result<ImageCheck, NodeFileError> {
    let Some(first) = chain.first() else {
        return Ok(ImageCheck::default());
    };
    let key = &first.key;
    let nodes = chain_nodes(chain);
    let effective = delta::effective(&nodes);
    let zero_tag = key.zero_page_tag();
    let total_pages = img.meta.guest_mem_bytes / PAGE_SIZE_U64;
    let io = |source| NodeFileError::Io {
        path: img.path.clone(),
        source,
    };
    let runs = data_runs(&img.file, img.meta.guest_mem_bytes).map_err(io)?;
    let expected = |p: u64| match effective.binary_search_by_key(&p, |(q, _)| *q) {
        Ok(i) => effective[i].1.crc,
        Err(_) => zero_tag,
    };
    let in_data = |p: u64| {
        runs.binary_search_by(|r| {
            if r.end <= p {
                std::cmp::Ordering::Less
            } else if r.start > p {
                std::cmp::Ordering::Greater
            } else {
                std::cmp::Ordering::Equal
            }
        })
        .is_ok()
    };
    let mut check = ImageCheck::default();
    // Pages in holes read as zero: they must be meant to be zero.
    for (p, src) in &effective {
        if !in_data(*p) && src.crc != zero_tag {
            check.bad.push(*p);
        }
    }
    let mut buf = vec![0u8; BUILD_CHUNK_PAGES * PAGE_SIZE];
    for run in &runs {
        let mut page = run.start;
        let end = run.end.min(total_pages);
        while page < end {
            let n = (end - page).min(BUILD_CHUNK_PAGES as u64);
            let chunk = &mut buf[..usize::try_from(n).unwrap_or(0) * PAGE_SIZE];
            img.file.read_exact_at(chunk, page * PAGE_SIZE_U64).map_err(io)?;
            for (i, bytes) in chunk.chunks_exact(PAGE_SIZE).enumerate() {
                let p = page + i as u64;
                let tag = key.page_tag(bytes);
                if tag != expected(p) {
                    check.bad.push(p);
                } else if tag != zero_tag {
                    check.nonzero.push(p);
                }
            }
            page += n;
        }
    }
    check.bad.sort_unstable();
    check.bad.dedup();
    Ok(check)
}
