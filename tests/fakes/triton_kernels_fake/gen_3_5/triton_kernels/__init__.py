"""Fake triton_kernels, release/3.5.x API (see triton_kernels_fake). Like the vendored copy, the
package itself imports nothing: submodules import each other as triton_kernels.*."""
