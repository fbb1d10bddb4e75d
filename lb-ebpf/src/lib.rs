// This file exists so that lb-agent can name lb-ebpf as a build dependency (cargo needs a library
// target for that); the programs are the binary targets, built for BPF by aya-build.
#![no_std]
