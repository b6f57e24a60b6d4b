"""CUDA sources (squinch.cuh, squinch.cu), shipped as package data and
compiled lazily by squinchcomm.codec.cuda."""
