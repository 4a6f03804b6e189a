"""fmjax: pretrain and adapt foundation models with JAX."""
