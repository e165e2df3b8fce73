/* placeholder so the library has a source until the kernels land */
int ms_cpu_placeholder_;
