//! Placeholder: the SOCKHASH programs land with the kernel fast-path issue.
#![no_std]
#![no_main]

#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
