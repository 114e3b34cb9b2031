;; wasm-hash: a compute kernel: 64-bit FNV-1a over the input, 1,000 passes
;; with the state carried from one pass to the next (the offset basis once);
;; returns the state (8 bytes, little endian).
(module
  (import "microfaas" "input_len" (func $input_len (result i32)))
  (import "microfaas" "input_read" (func $input_read (param i32 i32 i32)))
  (import "microfaas" "output_write" (func $output_write (param i32 i32)))
  (import "microfaas" "fail" (func $fail (param i32 i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "wasm-hash: no memory for the input")
  (func (export "handle")
    (local $len i32) (local $pages i32) (local $pass i32) (local $i i32) (local $h i64)
    (local.set $len (call $input_len))
    (local.set $pages (i32.add (i32.const 1)
      (i32.shr_u (i32.add (local.get $len) (i32.const 65535)) (i32.const 16))))
    (if (i32.gt_u (local.get $pages) (memory.size))
      (then
        (if (i32.eq (memory.grow (i32.sub (local.get $pages) (memory.size))) (i32.const -1))
          (then (call $fail (i32.const 0) (i32.const 34)) (return)))))
    (call $input_read (i32.const 65536) (i32.const 0) (local.get $len))
    (local.set $h (i64.const 0xcbf29ce484222325))
    (block $done
      (loop $passes
        (br_if $done (i32.ge_u (local.get $pass) (i32.const 1000)))
        (local.set $i (i32.const 0))
        (block $end
          (loop $bytes
            (br_if $end (i32.ge_u (local.get $i) (local.get $len)))
            (local.set $h (i64.mul
              (i64.xor (local.get $h)
                (i64.extend_i32_u (i32.load8_u (i32.add (i32.const 65536) (local.get $i)))))
              (i64.const 0x100000001b3)))
            (local.set $i (i32.add (local.get $i) (i32.const 1)))
            (br $bytes)))
        (local.set $pass (i32.add (local.get $pass) (i32.const 1)))
        (br $passes)))
    (i64.store (i32.const 64) (local.get $h))
    (call $output_write (i32.const 64) (i32.const 8))))
