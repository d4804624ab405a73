"""hpsearch plugin: a 1-D convolutional sequence classifier (`seqconv`) and its dataset (`waveforms`)."""
