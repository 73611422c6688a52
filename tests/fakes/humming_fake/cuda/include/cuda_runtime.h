/* placeholder: the fake humming's CUDA environment only needs these headers to exist */
