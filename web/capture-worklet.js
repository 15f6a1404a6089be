// The microphone end: an AudioWorkletProcessor that hands the main thread fixed frames of mono PCM
// ({type: "frame", data: Float32Array}, `frameMs` long, default 20 ms), for the speech detector and the recorder.

class CaptureProcessor extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const frameMs = (options.processorOptions || {}).frameMs ?? 20;
    this.frame = new Float32Array(Math.round((frameMs * sampleRate) / 1000));
    this.fill = 0;
  }

  process(inputs) {
    const input = inputs[0];
    if (input && input.length) {
      const channel = input[0];
      let pos = 0;
      while (pos < channel.length) {
        const n = Math.min(channel.length - pos, this.frame.length - this.fill);
        this.frame.set(channel.subarray(pos, pos + n), this.fill);
        this.fill += n;
        pos += n;
        if (this.fill === this.frame.length) {
          const data = this.frame;
          this.frame = new Float32Array(data.length);
          this.port.postMessage({ type: "frame", data }, [data.buffer]);
          this.fill = 0;
        }
      }
    }
    return true;
  }
}

registerProcessor("shoal-capture", CaptureProcessor);
