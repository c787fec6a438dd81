//! The pickle of a torch checkpoint (`data.pkl`), read without running it.
//!
//! A pickle is a program for a small stack machine whose `GLOBAL` opcode
//! imports any Python callable and whose `REDUCE` calls it: loading an
//! untrusted one with Python's `pickle` runs whatever it names
//! (`posix.system`, `builtins.eval`). This reader knows only the data opcodes
//! and the globals torch writes for a state dict, each of which it models
//! instead of importing:
//!
//! - `torch._utils._rebuild_tensor_v2` and `_rebuild_tensor_v3` (a tensor: a
//!   view of a storage), `torch._utils._rebuild_parameter` (a parameter: its
//!   tensor);
//! - the storage classes (`torch.FloatStorage`, `torch.BFloat16Storage`, ...,
//!   `torch.UntypedStorage`), which appear in the persistent ids that name a
//!   storage (`('storage', StorageClass, key, location, numel)`);
//! - `collections.OrderedDict` (called with no arguments) and torch's dtypes
//!   (`torch.float32`, ...).
//!
//! Any other global is an error naming it, raised when the `GLOBAL` opcode is
//! met, before anything could call it. Everything is bounded: the pickle's
//! size (by the caller), the objects it may create, the stack, the memo and the
//! nesting depth; lists and dicts that sit inside another container are frozen,
//! so that no reference cycle can form and every depth stays exact.

use crate::dtype::DType;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;

/// Objects a pickle may create (a state dict of 100,000 tensors needs about
/// 1.5 million).
const MAX_OBJECTS: u64 = 4 << 20;
/// Values on the stack at once (torch batches 1,000 items per `SETITEMS`).
const MAX_STACK: usize = 1 << 20;
/// Memo entries.
const MAX_MEMO: usize = 4 << 20;
/// Containers nested in containers (a state dict needs 4).
const MAX_DEPTH: u32 = 64;
/// The longest `GLOBAL` line read.
const MAX_GLOBAL_LINE: usize = 256;

/// Why a pickle is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PickleError {
    /// A global outside the allow-list (`module.name`).
    Unsafe(String),
    /// Anything else: malformed, unsupported or over a bound.
    Invalid(String),
}

/// A storage as a persistent id names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StorageRef {
    /// The entry `data/KEY` of the archive.
    pub key: String,
    /// The storage's element type (`U8` for an untyped storage).
    pub dtype: DType,
    /// Its elements.
    pub numel: u64,
}

/// A tensor: a strided view of a storage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorView {
    pub storage: Rc<StorageRef>,
    pub dtype: DType,
    /// In elements of `dtype`.
    pub offset: u64,
    pub shape: Vec<u64>,
    pub stride: Vec<u64>,
}

/// What a state dict's value can be once loaded.
#[derive(Debug, Clone, PartialEq)]
pub enum Item {
    Tensor(TensorView),
    /// Not a tensor (an int, a string, ...): its kind, for a message.
    Other(&'static str),
}

/// The callables and classes of the allow-list.
#[derive(Debug, Clone, PartialEq)]
enum Global {
    RebuildTensorV2,
    RebuildTensorV3,
    RebuildParameter,
    OrderedDict,
    /// A storage class and its element type (`None`: a class of an element
    /// type fleetmerge does not read).
    Storage(String, Option<DType>),
    /// A dtype object (`torch.float32`).
    Dtype(String, Option<DType>),
}

struct Seq {
    items: RefCell<Vec<Value>>,
    /// Nesting depth of the container (1 when it holds no container).
    depth: Cell<u32>,
    /// Set once it is inside another container: it may no longer change.
    frozen: Cell<bool>,
}

#[derive(Clone)]
enum Value {
    None,
    Bool,
    Int(i64),
    Float,
    Str(Rc<str>),
    Bytes,
    Tuple(Rc<[Value]>, u32),
    List(Rc<Seq>),
    /// Keys and values alternate.
    Dict(Rc<Seq>),
    Global(Rc<Global>),
    Storage(Rc<StorageRef>),
    Tensor(Rc<TensorView>),
}

impl Value {
    fn kind(&self) -> &'static str {
        match self {
            Value::None => "None",
            Value::Bool => "a bool",
            Value::Int(_) => "an int",
            Value::Float => "a float",
            Value::Str(_) => "a string",
            Value::Bytes => "bytes",
            Value::Tuple(..) => "a tuple",
            Value::List(_) => "a list",
            Value::Dict(_) => "a dict",
            Value::Global(_) => "a class or function",
            Value::Storage(_) => "a storage",
            Value::Tensor(_) => "a tensor",
        }
    }

    fn depth(&self) -> u32 {
        match self {
            Value::Tuple(_, d) => *d,
            Value::List(s) | Value::Dict(s) => s.depth.get(),
            _ => 0,
        }
    }

    /// Marks a container as held by another one.
    fn freeze(&self) {
        if let Value::List(s) | Value::Dict(s) = self {
            s.frozen.set(true);
        }
    }
}

fn invalid(m: impl Into<String>) -> PickleError {
    PickleError::Invalid(m.into())
}

/// The allow-list: what a `GLOBAL module name` may name.
fn global(module: &str, name: &str) -> Result<Global, PickleError> {
    let storage = |dtype| Ok(Global::Storage(format!("{module}.{name}"), dtype));
    match (module, name) {
        ("torch._utils", "_rebuild_tensor_v2") => Ok(Global::RebuildTensorV2),
        ("torch._utils", "_rebuild_tensor_v3") => Ok(Global::RebuildTensorV3),
        ("torch._utils", "_rebuild_parameter") => Ok(Global::RebuildParameter),
        ("collections", "OrderedDict") => Ok(Global::OrderedDict),
        ("torch", "UntypedStorage") | ("torch.storage", "UntypedStorage") => {
            storage(Some(DType::U8))
        }
        ("torch", n) if n.ends_with("Storage") => storage(match n {
            "DoubleStorage" => Some(DType::F64),
            "FloatStorage" => Some(DType::F32),
            "HalfStorage" => Some(DType::F16),
            "BFloat16Storage" => Some(DType::BF16),
            "LongStorage" => Some(DType::I64),
            "IntStorage" => Some(DType::I32),
            "ShortStorage" => Some(DType::I16),
            "CharStorage" => Some(DType::I8),
            "ByteStorage" => Some(DType::U8),
            "BoolStorage" => Some(DType::BOOL),
            "Float8_e4m3fnStorage" => Some(DType::F8_E4M3),
            "Float8_e5m2Storage" => Some(DType::F8_E5M2),
            // A real storage class of an element type we do not read
            // (complex, quantized); refused when a tensor uses it.
            "ComplexFloatStorage"
            | "ComplexDoubleStorage"
            | "QInt8Storage"
            | "QUInt8Storage"
            | "QInt32Storage"
            | "QUInt4x2Storage"
            | "QUInt2x4Storage" => None,
            _ => return Err(PickleError::Unsafe(format!("{module}.{name}"))),
        }),
        ("torch", n) => match torch_dtype(n) {
            Some(d) => Ok(Global::Dtype(format!("torch.{n}"), d)),
            None => Err(PickleError::Unsafe(format!("{module}.{name}"))),
        },
        _ => Err(PickleError::Unsafe(format!("{module}.{name}"))),
    }
}

/// torch's dtype names: `Some(Some(d))` for one fleetmerge reads,
/// `Some(None)` for a dtype it does not.
fn torch_dtype(name: &str) -> Option<Option<DType>> {
    Some(Some(match name {
        "float64" | "double" => DType::F64,
        "float32" | "float" => DType::F32,
        "float16" | "half" => DType::F16,
        "bfloat16" => DType::BF16,
        "int64" | "long" => DType::I64,
        "int32" | "int" => DType::I32,
        "int16" | "short" => DType::I16,
        "int8" => DType::I8,
        "uint8" => DType::U8,
        "uint16" => DType::U16,
        "uint32" => DType::U32,
        "uint64" => DType::U64,
        "bool" => DType::BOOL,
        "float8_e4m3fn" => DType::F8_E4M3,
        "float8_e5m2" => DType::F8_E5M2,
        "complex32" | "complex64" | "complex128" | "cfloat" | "cdouble" | "qint8" | "quint8"
        | "qint32" | "float8_e4m3fnuz" | "float8_e5m2fnuz" => return Some(None),
        _ => return None,
    }))
}

/// A pickle opcode's name, for messages.
fn opcode_name(op: u8) -> String {
    let name = match op {
        b'i' => "INST",
        b'o' => "OBJ",
        0x81 => "NEWOBJ",
        0x92 => "NEWOBJ_EX",
        0x82 => "EXT1",
        0x83 => "EXT2",
        0x84 => "EXT4",
        b'I' => "INT",
        b'L' => "LONG",
        b'F' => "FLOAT",
        b'S' => "STRING",
        b'V' => "UNICODE",
        b'P' => "PERSID",
        0x8f => "EMPTY_SET",
        0x90 => "ADDITEMS",
        0x91 => "FROZENSET",
        0x96 => "BYTEARRAY8",
        0x97 => "NEXT_BUFFER",
        0x98 => "READONLY_BUFFER",
        _ => return format!("0x{op:02x}"),
    };
    name.to_string()
}

struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    marks: Vec<usize>,
    memo: HashMap<u32, Value>,
    objects: u64,
}

impl<'a> Machine<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], PickleError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.data.len())
            .ok_or_else(|| {
                invalid(format!(
                    "ends inside an opcode's argument at byte {}",
                    self.pos
                ))
            })?;
        let out = &self.data[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    fn byte(&mut self) -> Result<u8, PickleError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, PickleError> {
        Ok(u16::from_le_bytes(
            self.take(2)?.try_into().unwrap_or_default(),
        ))
    }

    fn u32(&mut self) -> Result<u32, PickleError> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().unwrap_or_default(),
        ))
    }

    fn u64(&mut self) -> Result<u64, PickleError> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().unwrap_or_default(),
        ))
    }

    fn size(&mut self, n: u64) -> Result<usize, PickleError> {
        usize::try_from(n).map_err(|_| invalid("a length beyond the address space"))
    }

    fn line(&mut self) -> Result<&'a str, PickleError> {
        let rest = &self.data[self.pos..];
        let n = rest
            .iter()
            .take(MAX_GLOBAL_LINE)
            .position(|&b| b == b'\n')
            .ok_or_else(|| invalid(format!("a GLOBAL name at byte {} is not a line", self.pos)))?;
        let line = self.take(n + 1)?;
        std::str::from_utf8(&line[..n]).map_err(|_| invalid("a GLOBAL name is not UTF-8"))
    }

    fn push(&mut self, v: Value) -> Result<(), PickleError> {
        self.objects += 1;
        if self.objects > MAX_OBJECTS {
            return Err(invalid(format!("creates more than {MAX_OBJECTS} objects")));
        }
        if self.stack.len() >= MAX_STACK {
            return Err(invalid(format!(
                "its stack grows beyond {MAX_STACK} values"
            )));
        }
        self.stack.push(v);
        Ok(())
    }

    fn pop(&mut self) -> Result<Value, PickleError> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return Err(invalid(format!("pops an empty stack at byte {}", self.pos)));
        }
        self.stack
            .pop()
            .ok_or_else(|| invalid("pops an empty stack"))
    }

    fn top(&self) -> Result<&Value, PickleError> {
        let floor = self.marks.last().copied().unwrap_or(0);
        match self.stack.last() {
            Some(v) if self.stack.len() > floor => Ok(v),
            _ => Err(invalid(format!(
                "reads an empty stack at byte {}",
                self.pos
            ))),
        }
    }

    /// The values since the last MARK, which is removed.
    fn pop_mark(&mut self) -> Result<Vec<Value>, PickleError> {
        let mark = self
            .marks
            .pop()
            .ok_or_else(|| invalid(format!("no MARK for the opcode at byte {}", self.pos)))?;
        Ok(self.stack.split_off(mark.min(self.stack.len())))
    }

    fn memo_put(&mut self, key: u32) -> Result<(), PickleError> {
        let v = self.top()?.clone();
        if self.memo.len() >= MAX_MEMO && !self.memo.contains_key(&key) {
            return Err(invalid(format!("its memo grows beyond {MAX_MEMO} entries")));
        }
        self.memo.insert(key, v);
        Ok(())
    }

    fn memo_get(&mut self, key: u32) -> Result<(), PickleError> {
        let v =
            self.memo.get(&key).cloned().ok_or_else(|| {
                invalid(format!("reads memo entry {key}, which was never stored"))
            })?;
        self.push(v)
    }

    fn tuple(&mut self, items: Vec<Value>) -> Result<(), PickleError> {
        let depth = nested_depth(&items)?;
        items.iter().for_each(Value::freeze);
        self.push(Value::Tuple(items.into(), depth))
    }

    fn seq(items: Vec<Value>) -> Result<Rc<Seq>, PickleError> {
        let depth = nested_depth(&items)?;
        items.iter().for_each(Value::freeze);
        Ok(Rc::new(Seq {
            items: RefCell::new(items),
            depth: Cell::new(depth),
            frozen: Cell::new(false),
        }))
    }

    /// Adds `items` to the list or dict below them.
    fn extend(&mut self, items: Vec<Value>, dict: bool) -> Result<(), PickleError> {
        if dict && items.len() % 2 != 0 {
            return Err(invalid("SETITEMS with an odd number of values"));
        }
        // Freeze first: a container added to itself is then refused below.
        items.iter().for_each(Value::freeze);
        let target = self.top()?;
        let seq = match (target, dict) {
            (Value::List(s), false) | (Value::Dict(s), true) => s,
            (other, _) => {
                return Err(invalid(format!(
                    "adds items to {}, which is not a {}",
                    other.kind(),
                    if dict { "dict" } else { "list" }
                )))
            }
        };
        if seq.frozen.get() {
            return Err(invalid(
                "changes a list or dict that is already inside another container",
            ));
        }
        let depth = nested_depth(&items)?.max(seq.depth.get());
        seq.depth.set(depth);
        seq.items.borrow_mut().extend(items);
        Ok(())
    }

    fn reduce(&mut self) -> Result<(), PickleError> {
        let args = self.pop()?;
        let callable = self.pop()?;
        let Value::Global(g) = &callable else {
            return Err(invalid(format!(
                "calls {}, which is not a function",
                callable.kind()
            )));
        };
        let Value::Tuple(args, _) = args else {
            return Err(invalid("REDUCE's arguments are not a tuple"));
        };
        let v = match g.as_ref() {
            Global::OrderedDict if args.is_empty() => Value::Dict(Self::seq(Vec::new())?),
            Global::OrderedDict => {
                return Err(invalid("calls collections.OrderedDict with arguments"))
            }
            Global::RebuildTensorV2 => Value::Tensor(Rc::new(rebuild(&args, false)?)),
            Global::RebuildTensorV3 => Value::Tensor(Rc::new(rebuild(&args, true)?)),
            Global::RebuildParameter => match args.first() {
                Some(Value::Tensor(t)) if (2..=3).contains(&args.len()) => Value::Tensor(t.clone()),
                _ => {
                    return Err(invalid(
                        "_rebuild_parameter's first argument is not a tensor",
                    ))
                }
            },
            Global::Storage(name, _) | Global::Dtype(name, _) => {
                return Err(invalid(format!(
                    "calls {name}, which torch never calls in a checkpoint"
                )))
            }
        };
        self.push(v)
    }

    fn persistent(&mut self) -> Result<(), PickleError> {
        let pid = self.pop()?;
        let bad =
            || invalid("a persistent id is not ('storage', StorageClass, key, location, numel)");
        let Value::Tuple(items, _) = pid else {
            return Err(bad());
        };
        let [Value::Str(tag), Value::Global(class), Value::Str(key), Value::Str(_location), Value::Int(numel)] =
            &items[..]
        else {
            return Err(bad());
        };
        if &**tag != "storage" {
            return Err(bad());
        }
        let Global::Storage(name, dtype) = class.as_ref() else {
            return Err(bad());
        };
        let dtype = dtype.ok_or_else(|| {
            invalid(format!(
                "a storage is a {name}, whose element type fleetmerge does not read"
            ))
        })?;
        let numel = u64::try_from(*numel).map_err(|_| invalid("a storage has a negative size"))?;
        self.push(Value::Storage(Rc::new(StorageRef {
            key: key.to_string(),
            dtype,
            numel,
        })))
    }

    fn step(&mut self, op: u8) -> Result<bool, PickleError> {
        match op {
            0x80 => {
                let v = self.byte()?;
                if v > 5 {
                    return Err(invalid(format!("pickle protocol {v} is unknown")));
                }
            }
            0x95 => {
                self.u64()?; // FRAME: a length hint
            }
            b'.' => return Ok(true),
            b'(' => {
                if self.marks.len() >= MAX_STACK {
                    return Err(invalid("too many MARKs"));
                }
                self.marks.push(self.stack.len());
            }
            b'0' => {
                self.pop()?;
            }
            b'1' => {
                self.pop_mark()?;
            }
            b'2' => {
                let v = self.top()?.clone();
                self.push(v)?;
            }
            b'N' => self.push(Value::None)?,
            0x88 => self.push(Value::Bool)?,
            0x89 => self.push(Value::Bool)?,
            b'J' => {
                let v = i32::from_le_bytes(self.take(4)?.try_into().unwrap_or_default());
                self.push(Value::Int(v.into()))?
            }
            b'K' => {
                let v = self.byte()?;
                self.push(Value::Int(v.into()))?
            }
            b'M' => {
                let v = self.u16()?;
                self.push(Value::Int(v.into()))?
            }
            0x8a | 0x8b => {
                let n = if op == 0x8a {
                    u64::from(self.byte()?)
                } else {
                    u64::from(self.u32()?)
                };
                let n = self.size(n)?;
                let bytes = self.take(n)?;
                self.push(Value::Int(long(bytes)?))?
            }
            b'G' => {
                self.take(8)?;
                self.push(Value::Float)?
            }
            b'X' | 0x8c | 0x8d => {
                let n = match op {
                    b'X' => u64::from(self.u32()?),
                    0x8c => u64::from(self.byte()?),
                    _ => self.u64()?,
                };
                let n = self.size(n)?;
                let s = std::str::from_utf8(self.take(n)?)
                    .map_err(|_| invalid("a string is not UTF-8"))?;
                self.push(Value::Str(s.into()))?
            }
            b'T' | b'U' | b'B' | b'C' | 0x8e => {
                let n = match op {
                    b'T' | b'B' => u64::from(self.u32()?),
                    0x8e => self.u64()?,
                    _ => u64::from(self.byte()?),
                };
                let n = self.size(n)?;
                self.take(n)?;
                self.push(Value::Bytes)?
            }
            b']' => self.push(Value::List(Self::seq(Vec::new())?))?,
            b'}' => self.push(Value::Dict(Self::seq(Vec::new())?))?,
            b')' => self.tuple(Vec::new())?,
            b't' => {
                let items = self.pop_mark()?;
                self.tuple(items)?
            }
            0x85..=0x87 => {
                let n = usize::from(op - 0x84);
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.pop()?);
                }
                items.reverse();
                self.tuple(items)?
            }
            b'l' => {
                let items = self.pop_mark()?;
                self.push(Value::List(Self::seq(items)?))?
            }
            b'd' => {
                let items = self.pop_mark()?;
                if items.len() % 2 != 0 {
                    return Err(invalid("DICT with an odd number of values"));
                }
                self.push(Value::Dict(Self::seq(items)?))?
            }
            b'a' => {
                let v = self.pop()?;
                self.extend(vec![v], false)?
            }
            b'e' => {
                let items = self.pop_mark()?;
                self.extend(items, false)?
            }
            b's' => {
                let v = self.pop()?;
                let k = self.pop()?;
                self.extend(vec![k, v], true)?
            }
            b'u' => {
                let items = self.pop_mark()?;
                self.extend(items, true)?
            }
            b'q' => {
                let k = self.byte()?;
                self.memo_put(k.into())?
            }
            b'r' => {
                let k = self.u32()?;
                self.memo_put(k)?
            }
            0x94 => {
                let k = u32::try_from(self.memo.len()).map_err(|_| invalid("memo too large"))?;
                self.memo_put(k)?
            }
            b'h' => {
                let k = self.byte()?;
                self.memo_get(k.into())?
            }
            b'j' => {
                let k = self.u32()?;
                self.memo_get(k)?
            }
            b'p' | b'g' => {
                let line = self.line()?;
                let k: u32 = line
                    .parse()
                    .map_err(|_| invalid(format!("memo key {line:?} is not a number")))?;
                if op == b'p' {
                    self.memo_put(k)?
                } else {
                    self.memo_get(k)?
                }
            }
            b'c' | b'i' => {
                let module = self.line()?;
                let name = self.line()?;
                let g = global(module, name)?;
                if op == b'i' {
                    return Err(invalid(format!("INST of {module}.{name}")));
                }
                self.push(Value::Global(Rc::new(g)))?
            }
            0x93 => {
                let name = self.pop()?;
                let module = self.pop()?;
                let (Value::Str(module), Value::Str(name)) = (module, name) else {
                    return Err(invalid("STACK_GLOBAL of something that is not two strings"));
                };
                let g = global(&module, &name)?;
                self.push(Value::Global(Rc::new(g)))?
            }
            b'R' => self.reduce()?,
            b'Q' => self.persistent()?,
            b'b' => {
                // BUILD sets attributes: only the `_metadata` torch's
                // state dicts carry, which is ignored.
                let _state = self.pop()?;
                match self.top()? {
                    Value::Dict(_) => {}
                    other => {
                        return Err(invalid(format!(
                            "sets the attributes of {}, which torch never does in a checkpoint",
                            other.kind()
                        )))
                    }
                }
            }
            other => {
                return Err(invalid(format!(
                    "opcode {} at byte {} is not one torch writes for a state dict",
                    opcode_name(other),
                    self.pos - 1
                )))
            }
        }
        Ok(false)
    }
}

/// The depth of a container holding `items`.
fn nested_depth(items: &[Value]) -> Result<u32, PickleError> {
    let depth = items.iter().map(Value::depth).max().unwrap_or(0) + 1;
    if depth > MAX_DEPTH {
        return Err(invalid(format!(
            "containers nested deeper than {MAX_DEPTH}"
        )));
    }
    Ok(depth)
}

/// A little-endian two's complement integer of LONG1/LONG4.
fn long(bytes: &[u8]) -> Result<i64, PickleError> {
    if bytes.len() > 8 {
        return Err(invalid("an integer wider than 64 bits"));
    }
    let negative = bytes.last().is_some_and(|b| b & 0x80 != 0);
    let mut buf = [if negative { 0xff } else { 0 }; 8];
    buf[..bytes.len()].copy_from_slice(bytes);
    Ok(i64::from_le_bytes(buf))
}

fn int(v: &Value, what: &str) -> Result<u64, PickleError> {
    match v {
        Value::Int(i) => {
            u64::try_from(*i).map_err(|_| invalid(format!("a tensor's {what} is negative")))
        }
        other => Err(invalid(format!(
            "a tensor's {what} is {}, not an int",
            other.kind()
        ))),
    }
}

fn ints(v: &Value, what: &str) -> Result<Vec<u64>, PickleError> {
    match v {
        Value::Tuple(items, _) => items.iter().map(|i| int(i, what)).collect(),
        other => Err(invalid(format!(
            "a tensor's {what} is {}, not a tuple",
            other.kind()
        ))),
    }
}

/// `_rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad,
/// backward_hooks[, metadata])`, or v3 with a dtype after the hooks.
fn rebuild(args: &[Value], v3: bool) -> Result<TensorView, PickleError> {
    let (base, extra) = if v3 { (7, 8) } else { (6, 7) };
    if args.len() != base && args.len() != extra {
        return Err(invalid(format!(
            "_rebuild_tensor_v{} takes {base} or {extra} arguments, not {}",
            if v3 { 3 } else { 2 },
            args.len()
        )));
    }
    let Value::Storage(storage) = &args[0] else {
        return Err(invalid(format!("a tensor's storage is {}", args[0].kind())));
    };
    let offset = int(&args[1], "storage offset")?;
    let shape = ints(&args[2], "size")?;
    let stride = ints(&args[3], "stride")?;
    if shape.len() != stride.len() {
        return Err(invalid(format!(
            "a tensor has {} dimensions but {} strides",
            shape.len(),
            stride.len()
        )));
    }
    if shape.len() > 64 {
        return Err(invalid("a tensor with more than 64 dimensions"));
    }
    let dtype = if v3 {
        match &args[6] {
            Value::Global(g) => match g.as_ref() {
                Global::Dtype(_, Some(d)) => *d,
                Global::Dtype(name, None) => {
                    return Err(invalid(format!(
                        "a tensor of {name}, which fleetmerge does not read"
                    )))
                }
                _ => return Err(invalid("_rebuild_tensor_v3's dtype is not a dtype")),
            },
            _ => return Err(invalid("_rebuild_tensor_v3's dtype is not a dtype")),
        }
    } else {
        storage.dtype
    };
    Ok(TensorView {
        storage: storage.clone(),
        dtype,
        offset,
        shape,
        stride,
    })
}

/// Runs the pickle and returns its state dict: (name, item) in file order.
/// A top-level dict whose `state_dict` key holds a dict stands for that dict,
/// as mergekit reads it.
pub fn load(data: &[u8]) -> Result<Vec<(String, Item)>, PickleError> {
    let mut m = Machine {
        data,
        pos: 0,
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
        objects: 0,
    };
    loop {
        if m.pos >= data.len() {
            return Err(invalid("ends without a STOP opcode"));
        }
        let op = m.byte()?;
        if m.step(op)? {
            break;
        }
    }
    let top = m
        .stack
        .pop()
        .ok_or_else(|| invalid("STOP with an empty stack"))?;
    let Value::Dict(mut dict) = top else {
        return Err(invalid(format!(
            "holds {}, not a dict of tensors",
            top.kind()
        )));
    };
    let nested = {
        let items = dict.items.borrow();
        items.chunks(2).find_map(|kv| match kv {
            [Value::Str(k), Value::Dict(inner)] if &**k == "state_dict" => Some(inner.clone()),
            _ => None,
        })
    };
    if let Some(inner) = nested {
        dict = inner;
    }
    let items = dict.items.borrow();
    items
        .chunks(2)
        .map(|kv| match kv {
            [Value::Str(k), Value::Tensor(t)] => Ok((k.to_string(), Item::Tensor((**t).clone()))),
            [Value::Str(k), other] => Ok((k.to_string(), Item::Other(other.kind()))),
            [k, _] => Err(invalid(format!(
                "a key of the state dict is {}, not a string",
                k.kind()
            ))),
            _ => Err(invalid("a state dict entry without a value")),
        })
        .collect()
}
