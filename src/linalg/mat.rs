//! A plain row-major f32 matrix: what LoRA factors and delta weights are while adapters are
//! combined. Products go through candle; element-wise work (pruning, sign election) is on the
//! slice.

use candle_core::{DType, Device, Tensor};

use crate::error::Result;

#[derive(Debug, Clone, PartialEq)]
pub struct Mat {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f32>,
}

impl Mat {
    pub fn zeros(rows: usize, cols: usize) -> Mat {
        Mat {
            rows,
            cols,
            data: vec![0.0; rows * cols],
        }
    }

    pub fn from_tensor(t: &Tensor) -> Result<Mat> {
        let (rows, cols) = t.dims2()?;
        let data = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        Ok(Mat { rows, cols, data })
    }

    pub fn to_tensor(&self) -> Result<Tensor> {
        Ok(Tensor::from_slice(&self.data, (self.rows, self.cols), &Device::Cpu)?)
    }

    /// `self · other` in f32.
    pub fn matmul(&self, other: &Mat) -> Result<Mat> {
        Mat::from_tensor(&self.to_tensor()?.matmul(&other.to_tensor()?)?)
    }

    /// Every element times `f`, in f32 (as PyTorch multiplies a float tensor by a Python float).
    pub fn scaled(&self, f: f32) -> Mat {
        Mat {
            rows: self.rows,
            cols: self.cols,
            data: self.data.iter().map(|x| x * f).collect(),
        }
    }

    /// Stack row blocks (all with the same number of columns).
    pub fn vcat(parts: &[Mat], cols: usize) -> Mat {
        let rows = parts.iter().map(|p| p.rows).sum();
        let mut data = Vec::with_capacity(rows * cols);
        for p in parts {
            data.extend_from_slice(&p.data);
        }
        Mat { rows, cols, data }
    }

    /// Put column blocks side by side (all with the same number of rows).
    pub fn hcat(parts: &[Mat], rows: usize) -> Mat {
        let cols: usize = parts.iter().map(|p| p.cols).sum();
        let mut data = Vec::with_capacity(rows * cols);
        for r in 0..rows {
            for p in parts {
                data.extend_from_slice(&p.data[r * p.cols..(r + 1) * p.cols]);
            }
        }
        Mat { rows, cols, data }
    }

    /// Zero rows appended up to `rows` (a LoRA A padded to a larger rank).
    pub fn pad_rows(mut self, rows: usize) -> Mat {
        if rows > self.rows {
            self.data.resize(rows * self.cols, 0.0);
            self.rows = rows;
        }
        self
    }

    /// Zero columns appended up to `cols` (a LoRA B padded to a larger rank).
    pub fn pad_cols(self, cols: usize) -> Mat {
        if cols <= self.cols {
            return self;
        }
        let mut out = Mat::zeros(self.rows, cols);
        for r in 0..self.rows {
            out.data[r * cols..r * cols + self.cols].copy_from_slice(&self.data[r * self.cols..(r + 1) * self.cols]);
        }
        out
    }
}
