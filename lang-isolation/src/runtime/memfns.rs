//! `memcpy`, `memmove`, `memset` and `memcmp` for function images in a
//! process that uses protection keys. glibc's versions read tuning globals
//! (`__x86_shared_non_temporal_threshold`, `__x86_rep_movsb_threshold`)
//! from libc's data, which carries key 0 and is closed while a function
//! runs; these touch nothing but their arguments. String instructions
//! (`rep movsb`/`stosb`, `repe cmpsb`): fast on CPUs with ERMS, no data of
//! their own. The loader resolves an image's imports to them when keys are
//! in use ([`super::pkeys::key_safe_imports`]).

std::arch::global_asm!(
    ".pushsection .text.microfaas_memfns,\"ax\",@progbits",
    ".p2align 4",
    ".globl microfaas_memcpy",
    ".hidden microfaas_memcpy",
    ".type microfaas_memcpy, @function",
    "microfaas_memcpy:",
    "mov rax, rdi",
    "mov rcx, rdx",
    "rep movsb",
    "ret",
    ".p2align 4",
    ".globl microfaas_memmove",
    ".hidden microfaas_memmove",
    ".type microfaas_memmove, @function",
    "microfaas_memmove:",
    "mov rax, rdi",
    "mov rcx, rdx",
    // Forward unless dst lies inside (src, src + n).
    "mov r8, rdi",
    "sub r8, rsi",
    "cmp r8, rdx",
    "jae 2f",
    "test rcx, rcx",
    "jz 3f",
    "lea rsi, [rsi + rcx - 1]",
    "lea rdi, [rdi + rcx - 1]",
    "std",
    "rep movsb",
    "cld",
    "ret",
    "2:",
    "rep movsb",
    "3:",
    "ret",
    ".p2align 4",
    ".globl microfaas_memset",
    ".hidden microfaas_memset",
    ".type microfaas_memset, @function",
    "microfaas_memset:",
    "mov r8, rdi",
    "mov eax, esi",
    "mov rcx, rdx",
    "rep stosb",
    "mov rax, r8",
    "ret",
    ".p2align 4",
    ".globl microfaas_memcmp",
    ".hidden microfaas_memcmp",
    ".type microfaas_memcmp, @function",
    "microfaas_memcmp:",
    "xor eax, eax",
    "mov rcx, rdx",
    "test rcx, rcx",
    "jz 4f",
    "repe cmpsb",
    "je 4f",
    "movzx eax, byte ptr [rdi - 1]",
    "movzx ecx, byte ptr [rsi - 1]",
    "sub eax, ecx",
    "4:",
    "ret",
    ".popsection",
);

unsafe extern "C" {
    fn microfaas_memcpy(dst: *mut u8, src: *const u8, n: usize) -> *mut u8;
    fn microfaas_memmove(dst: *mut u8, src: *const u8, n: usize) -> *mut u8;
    fn microfaas_memset(dst: *mut u8, c: i32, n: usize) -> *mut u8;
    fn microfaas_memcmp(a: *const u8, b: *const u8, n: usize) -> i32;
}

/// `memmove` touching nothing but its arguments, for host services that
/// run with a function's PKRU (glibc's reads libc's data, on key 0).
///
/// # Safety
/// As `core::ptr::copy`: `n` readable bytes at `src`, `n` writable at `dst`.
pub(crate) unsafe fn memmove(dst: *mut u8, src: *const u8, n: usize) {
    // SAFETY: caller contract; the routine only reads and writes those bytes.
    unsafe { microfaas_memmove(dst, src, n) };
}

/// Addresses of `memcpy`, `memmove`, `memset`, `memcmp`.
pub(crate) fn addresses() -> [usize; 4] {
    [
        microfaas_memcpy as *const () as usize,
        microfaas_memmove as *const () as usize,
        microfaas_memset as *const () as usize,
        microfaas_memcmp as *const () as usize,
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Against core's own: copies (overlapping both ways), fills, comparisons.
        #[test]
        fn behave_like_the_real_ones(data in proptest::collection::vec(any::<u8>(), 0..300), a in 0usize..300, b in 0usize..300, n in 0usize..300, c in any::<u8>()) {
            let len = data.len();
            let (a, b) = (a.min(len), b.min(len));
            let n = n.min(len - a.max(b));
            let mut x = data.clone();
            let mut y = data.clone();
            // SAFETY: both ranges lie inside `x` (and `y`).
            unsafe { microfaas_memmove(x.as_mut_ptr().add(a), x.as_ptr().add(b), n) };
            y.copy_within(b..b + n, a);
            prop_assert_eq!(&x, &y);
            let mut z = vec![0u8; n];
            // SAFETY: `z` and the source hold `n` bytes, distinct buffers.
            unsafe { microfaas_memcpy(z.as_mut_ptr(), data.as_ptr().add(b), n) };
            prop_assert_eq!(&z[..], &data[b..b + n]);
            // SAFETY: `z` holds `n` bytes.
            unsafe { microfaas_memset(z.as_mut_ptr(), i32::from(c), n) };
            prop_assert!(z.iter().all(|&v| v == c));
            // SAFETY: both ranges hold `n` bytes.
            let got = unsafe { microfaas_memcmp(data.as_ptr().add(a), data.as_ptr().add(b), n) };
            let want = data[a..a + n].cmp(&data[b..b + n]);
            prop_assert_eq!(got.signum(), want as i32);
        }
    }
}
