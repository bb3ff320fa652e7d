"""CST tractography: the compiled propagation kernels (EuDX, cone-restricted ODF
tracking), seeding and parallel tracking, and the anatomical selection of the tracts."""
