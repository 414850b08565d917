//! Runtime dispatch of hot loops to an AVX2 build where the CPU has it.
//!
//! Wheels target baseline x86-64 (SSE2), where unsigned 32-bit comparisons and maxima do not
//! vectorise. [`multiversion!`] compiles a function body twice, once as is and once with AVX2
//! enabled, and picks one at run time (the CPU check is cached by the standard library). Results
//! are identical: only integer work is affected, and float comparisons are IEEE in both builds.

/// Defines `fn name(args) -> ret { body }` with a portable and an AVX2 build of `body`.
macro_rules! multiversion {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) -> $ret:ty $body:block) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) -> $ret {
            #[inline(always)]
            fn portable($($arg: $ty),*) -> $ret $body

            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2")]
                unsafe fn avx2($($arg: $ty),*) -> $ret {
                    portable($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx2") {
                    // SAFETY: the CPU supports AVX2, checked just above.
                    return unsafe { avx2($($arg),*) };
                }
            }
            portable($($arg),*)
        }
    };
}

pub(crate) use multiversion;
