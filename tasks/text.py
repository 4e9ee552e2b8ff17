"""Text nodes (SPEC §5, §8): ConversationToParagraph, ParseJsonString,
ChineseCleanAndFilter.

List and struct columns are handled as Arrow types (offsets + child arrays),
never by checking for Python lists.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import ConfigDict, Field

from tasks._models import require_text_field, schema_with, text_column, with_column
from tasks.base import BatchNode, NodeParams, RunContext, Stream, register
from tasks.checks import require_column

# ---------------------------------------------------------------------------
# ConversationToParagraph


class ConversationToParagraphParams(NodeParams):
    input_col: str = "conversation"
    output_col: str = "text"
    separator: str = "\n\n"
    field_key: str = "content"


@register
class ConversationToParagraph(BatchNode):
    """Join the ``field_key`` of every item of a list<struct> conversation with
    ``separator``. Null items/contents are skipped; a null conversation gives
    null. A list of plain strings is joined as is."""

    type_name = "ConversationToParagraph"
    Params = ConversationToParagraphParams

    def _item_values(self, t: pa.DataType) -> None:
        p = self.params
        if not (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)):
            raise self.error(f"input_col {p.input_col!r} must be a list (a conversation), got {t}")
        item = t.value_type
        if pa.types.is_struct(item):
            if item.get_field_index(p.field_key) < 0:
                names = ", ".join(item.field(i).name for i in range(item.num_fields))
                raise self.error(f"field_key {p.field_key!r} is not a field of the conversation items (fields: {names})")
            item = item.field(p.field_key).type
        if not (pa.types.is_string(item) or pa.types.is_large_string(item)):
            raise self.error(f"the conversation items' {p.field_key!r} must be text, got {item}")

    def _join(self, arr: pa.Array) -> pa.Array:
        p = self.params
        if pa.types.is_fixed_size_list(arr.type):
            arr = arr.cast(pa.list_(arr.type.value_type))
        values = arr.flatten()
        if pa.types.is_struct(values.type):
            values = pc.struct_field(values, p.field_key)
        values = values.cast(pa.string())
        # Skip null contents: rebuild the lists from the surviving items.
        parents = pc.list_parent_indices(arr)
        keep = values.is_valid()
        values, parents = values.filter(keep), parents.filter(keep)
        counts = pc.value_counts(parents)
        lengths = [0] * len(arr)
        for entry in counts.to_pylist():
            lengths[entry["values"]] = entry["counts"]
        offsets = [0]
        for n in lengths:
            offsets.append(offsets[-1] + n)
        lists = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), values, mask=arr.is_null())
        return pc.binary_join(lists, p.separator)

    def transform(self, batch: pa.Table) -> pa.Table:
        p = self.params
        self._item_values(require_column(self, batch.schema, p.input_col, param="input_col").type)
        col = batch.column(p.input_col)
        chunks = [self._join(c) for c in col.chunks] or [pa.array([], pa.string())]
        return with_column(batch, p.output_col, pa.chunked_array(chunks, pa.string()))

    def output_schema(self, schema: pa.Schema) -> pa.Schema:
        p = self.params
        self._item_values(require_column(self, schema, p.input_col, param="input_col").type)
        return schema_with(schema, p.output_col, pa.string())


# ---------------------------------------------------------------------------
# ParseJsonString

_SIMPLE_TYPES = {
    "string": pa.string(), "str": pa.string(), "text": pa.string(), "varchar": pa.string(),
    "int": pa.int64(), "integer": pa.int64(), "bigint": pa.int64(), "long": pa.int64(), "int64": pa.int64(),
    "int32": pa.int32(), "smallint": pa.int16(), "tinyint": pa.int8(),
    "float": pa.float64(), "double": pa.float64(), "float64": pa.float64(), "float32": pa.float32(), "real": pa.float32(),
    "bool": pa.bool_(), "boolean": pa.bool_(),
}


class _TypeParser:
    """Parses Spark-DDL-like type text: ``a STRING, b ARRAY<INT>, c STRUCT<x: DOUBLE>``."""

    def __init__(self, text: str):
        self.tokens = re.findall(r"[A-Za-z_][A-Za-z0-9_]*|[<>,:()]|\S", text)
        self.i = 0

    def peek(self):
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def take(self, expected: str | None = None) -> str:
        tok = self.peek()
        if tok is None or (expected is not None and tok != expected):
            raise ValueError(f"expected {expected or 'a type'} at {' '.join(self.tokens[self.i:self.i+3]) or 'end'}")
        self.i += 1
        return tok

    def fields(self, closing: str | None = None) -> list[pa.Field]:
        out = []
        while True:
            name = self.take()
            if self.peek() == ":":
                self.take(":")
            out.append(pa.field(name, self.type_()))
            if self.peek() == ",":
                self.take(",")
                continue
            if self.peek() == closing:
                return out
            raise ValueError(f"unexpected {self.peek()!r}")

    def type_(self) -> pa.DataType:
        name = self.take().lower()
        if name in ("array", "list"):
            self.take("<")
            inner = self.type_()
            self.take(">")
            return pa.list_(inner)
        if name == "struct":
            self.take("<")
            fields = self.fields(">")
            self.take(">")
            return pa.struct(fields)
        if name == "map":
            self.take("<")
            k = self.type_()
            self.take(",")
            v = self.type_()
            self.take(">")
            return pa.map_(k, v)
        if name == "decimal":  # decimal(p, s) -> double
            if self.peek() == "(":
                while self.take() != ")":
                    pass
            return pa.float64()
        if name not in _SIMPLE_TYPES:
            raise ValueError(f"unknown type {name!r}")
        return _SIMPLE_TYPES[name]


def parse_schema(schema: str | dict[str, str]) -> pa.StructType:
    if isinstance(schema, dict):
        return pa.struct([pa.field(k, _TypeParser(v).type_()) for k, v in schema.items()])
    parser = _TypeParser(schema)
    fields = parser.fields(None)
    return pa.struct(fields)


def _coerce(value: Any, t: pa.DataType):
    """JSON value -> Python value of Arrow type ``t`` (lenient for numbers
    written as strings and nested JSON text)."""
    if value is None:
        return None
    if pa.types.is_struct(t):
        if isinstance(value, str):
            value = json.loads(value)
        if not isinstance(value, dict):
            raise ValueError(f"expected an object, got {type(value).__name__}")
        return {t.field(i).name: _coerce(value.get(t.field(i).name), t.field(i).type) for i in range(t.num_fields)}
    if pa.types.is_list(t):
        if not isinstance(value, list):
            raise ValueError(f"expected an array, got {type(value).__name__}")
        return [_coerce(v, t.value_type) for v in value]
    if pa.types.is_map(t):
        if not isinstance(value, dict):
            raise ValueError(f"expected an object, got {type(value).__name__}")
        return [(k, _coerce(v, t.item_type)) for k, v in value.items()]
    if pa.types.is_string(t):
        return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    if pa.types.is_boolean(t):
        if isinstance(value, bool):
            return value
        raise ValueError(f"expected a boolean, got {value!r}")
    if pa.types.is_integer(t) or pa.types.is_floating(t):
        want = "an integer" if pa.types.is_integer(t) else "a number"
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError(f"expected {want}, got {value!r}")
        try:
            f = float(value)
        except ValueError:
            raise ValueError(f"expected {want}, got {value!r}") from None
        if pa.types.is_floating(t):
            return f
        if f != int(f):
            raise ValueError(f"expected an integer, got {value!r}")
        return int(f)
    return value


class ParseJsonStringParams(NodeParams):
    input_col: str
    output_col: str | None = None
    schema_: str | dict[str, str] | None = Field(default=None, alias="schema")
    flatten: bool = False
    on_error: Literal["fail", "null"] = "fail"

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, populate_by_name=True)


@register
class ParseJsonString(BatchNode):
    """Parse a JSON string column.

    With ``schema`` (Spark DDL such as ``"title STRING, tags ARRAY<STRING>"``
    or a mapping name -> type) the output is a struct of those fields (missing
    keys null, extra keys ignored); with ``flatten: true`` each field becomes a
    top-level column instead. Without a schema the output is a
    ``map<string, string>`` of the top-level keys (non-string values as JSON
    text), so the output schema is always known before data is read.
    ``on_error``: ``fail`` (default) raises an error naming the row;
    ``null`` gives null for unparsable rows.
    """

    type_name = "ParseJsonString"
    Params = ParseJsonStringParams

    @classmethod
    def validate_params(cls, p) -> list[str]:
        problems = []
        if p.schema_ is not None:
            try:
                parse_schema(p.schema_)
            except ValueError as exc:
                problems.append(f"schema: {exc}")
        if p.flatten and p.schema_ is None:
            problems.append("flatten needs a schema")
        if not p.flatten and not p.output_col:
            problems.append("output_col is required (unless flatten is true)")
        return problems

    def _type(self) -> pa.DataType:
        if self.params.schema_ is None:
            return pa.map_(pa.string(), pa.string())
        return parse_schema(self.params.schema_)

    def _add(self, schema_or_batch, parsed_type: pa.DataType, column=None):
        p = self.params
        is_schema = isinstance(schema_or_batch, pa.Schema)
        if p.flatten:
            out = schema_or_batch
            for i in range(parsed_type.num_fields):
                f = parsed_type.field(i)
                if is_schema:
                    out = schema_with(out, f.name, f.type)
                else:
                    out = with_column(out, f.name, pc.struct_field(column, i))
            return out
        if is_schema:
            return schema_with(schema_or_batch, p.output_col, parsed_type)
        return with_column(schema_or_batch, p.output_col, column)

    def transform(self, batch: pa.Table) -> pa.Table:
        p = self.params
        require_column(self, batch.schema, p.input_col, param="input_col")
        texts_col = batch.column(p.input_col)
        t = self._type()
        values = []
        for i, text in enumerate(texts_col.to_pylist()):
            if text is None or (isinstance(text, (str, bytes)) and not text.strip()):
                values.append(None)
                continue
            stage = "cannot parse {!r} as JSON"
            try:
                obj = json.loads(text)
                stage = "{!r} does not match the schema"
                if self.params.schema_ is None:
                    if not isinstance(obj, dict):
                        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
                    obj = [(k, v if isinstance(v, str) or v is None else json.dumps(v, ensure_ascii=False)) for k, v in obj.items()]
                else:
                    obj = _coerce(obj, t)
            except (ValueError, TypeError, UnicodeDecodeError) as exc:
                if p.on_error == "null":
                    values.append(None)
                    continue
                what = stage.format(str(text)[:80])
                raise self.error(f"row {i} of a batch: {what}: {exc} (on_error: null turns such rows into null)") from None
            values.append(obj)
        return self._add(batch, t, pa.array(values, t))

    def output_schema(self, schema: pa.Schema) -> pa.Schema:
        require_text_field(self, schema, self.params.input_col)
        return self._add(schema, self._type())


# ---------------------------------------------------------------------------
# ChineseCleanAndFilter
#
# Rules are ours (written from what Chinese web crawls look like), grouped by
# the categories SPEC §8 lists and applied in that order. Each removal is
# replaced by a space; whitespace is collapsed at the end.

_F = re.IGNORECASE | re.MULTILINE

# Spam gate -----------------------------------------------------------------
_CONTACT = re.compile(
    r"(?:加|添加|\+)\s*(?:微信|vx|v信|威信|wx|qq|扣扣)|(?:微信|vx|v信|wx|weixin|qq|扣扣|企鹅)\s*(?:号|群)?\s*[:：]?\s*[a-z0-9_-]{5,}",
    re.IGNORECASE,
)
_OFFICIAL_ACCOUNT = re.compile(
    r"关注[^。\n]{0,15}(?:公众号|微信号|服务号)|(?:公众号|服务号)[^。\n]{0,12}(?:回复|获取|领取|免费|关注)|长按(?:识别|扫码)[^。\n]{0,10}二维码|扫码(?:关注|加入|领取)"
)
_AD_WORDS = r"(?:咨询|热线|电话|特价|优惠|免费|包治|根治|祖传|秘方|偏方|无效退款|疗效显著|专家|名医|预约|挂号|老中医|药到病除|一针见效)"
_MED_WORDS = r"(?:治疗|医院|诊所|牛皮癣|银屑病|白癜风|性病|梅毒|尖锐湿疣|不孕不育|阳痿|早泄|前列腺|癫痫|痔疮|狐臭|鼻炎|乙肝|妇科|男科|肿瘤|风湿)"
_AD_MEDICAL = re.compile(rf"{_AD_WORDS}[^。\n]{{0,30}}{_MED_WORDS}|{_MED_WORDS}[^。\n]{{0,30}}{_AD_WORDS}")
_PROMO = re.compile(
    r"丰胸|隆胸|减肥|瘦身|整形|整容|美容院|隆鼻|双眼皮|祛斑|美白针|脱毛|增高|壮阳|伟哥|玻尿酸|抽脂|吸脂|祛痘|医美"
)

# Cleaning rules, in SPEC order ---------------------------------------------
_HTML = [
    re.compile(r"<(script|style|noscript|iframe)\b.*?</\1\s*>", re.IGNORECASE | re.DOTALL),
    re.compile(r"<!--.*?-->", re.DOTALL),
    re.compile(r"</?[a-zA-Z][a-zA-Z0-9]*(?:\s[^<>]{0,500})?/?>"),
    re.compile(r"&(?:nbsp|ensp|emsp|amp|lt|gt|quot|apos|middot|hellip|mdash|ldquo|rdquo|#\d{1,6}|#x[0-9a-fA-F]{1,6});"),
]
_MD_IMAGE = re.compile(r"!\[[^\]\n]{0,200}\]\([^)\n]{0,500}\)")
_URL_EMAIL = [
    _MD_IMAGE,  # before URLs, so an image's URL does not leave "![..]( )" behind
    re.compile(r"\b(?:https?|ftp)://[^\s<>\"'，。；、！？（）()【】\[\]「」]+", re.IGNORECASE),
    re.compile(r"\bwww\.[a-z0-9-]+(?:\.[a-z0-9-]+)+(?:/[^\s<>\"'，。；、！？（）()【】]*)?", re.IGNORECASE),
    re.compile(r"\b[a-z0-9._%+-]+@[a-z0-9-]+(?:\.[a-z0-9-]+)*\.[a-z]{2,}\b", re.IGNORECASE),
    re.compile(r"\b[a-z0-9-]+(?:\.[a-z0-9-]+)*\.(?:com|cn|net|org)(?:\.cn)?(?:/[^\s，。]*)?\b", re.IGNORECASE),
]
_PAGINATION = [
    re.compile(r"(?:首页|上一页|«|‹)?\s*(?:\d{1,4}\s+){1,}\d{0,4}\s*(?:\.\.\.|…)?\s*(?:下一页|尾页|末页|»|›)"),
    re.compile(r"上一页|下一页|尾页|末页|返回顶部|返回列表|[上下]一篇[:：][^\n]{0,40}"),
    re.compile(r"(?:第|共)\s*\d+\s*页|\d+\s*/\s*\d+\s*页|跳转到?\s*第?\s*\d*\s*页|点击加载更多|加载更多|查看更多"),
]
_BREADCRUMB = [
    re.compile(r"(?:当前位置|您的位置|您现在的位置|所在位置|现在位置)\s*[:：]\s*[^\n]{0,80}"),
    re.compile(r"(?:网站首页|首页|主页)\s*[>»›/]\s*(?:[^\n>»›]{1,20}\s*[>»›]\s*)*[^\s>»›，。]{0,20}"),
]
_BOILERPLATE = re.compile(
    r"设为首页|加入收藏|收藏本站|网站地图|站点地图|联系我们|关于我们|免责声明|隐私政策|法律声明|意见反馈|网站导航|"
    r"打印本页|关闭窗口|打印此文|【?\s*字[体号]\s*[:：]\s*大\s*中\s*小\s*】?|分享到\s*[:：]?|阅读原文|展开全文|点击这里查看原文|点击查看原文|"
    r"[【\[]\s*(?:打印|关闭|收藏|纠错|评论)\s*[】\]]|登录\s*[|丨]\s*注册|回复\s*[|丨]\s*引用(?:\s*[|丨]\s*举报)?|用户登录|免费注册|相关阅读\s*[:：]?|相关推荐\s*[:：]?|热门推荐\s*[:：]?"
)
_COPYRIGHT = [
    re.compile(
        r"^[^\n]{0,60}(?:版权所有|版权归|copyright|©|all rights reserved|未经(?:授权|许可)[^\n]{0,10}转载|转载请注明|"
        r"ICP[备证]|公网安备|本站声明|本文来源于网络)[^\n]{0,100}$",
        _F,
    ),
    re.compile(r"(?:版权所有|copyright\s*(?:©|\(c\))?|©|all rights reserved)[^。\n]{0,40}", re.IGNORECASE),
]
_BYLINE = [
    re.compile(r"[（(]\s*(?:记者|通讯员|实习生|本报记者|特约记者)[^（）()\n]{1,30}[）)]"),
    re.compile(r"(?:责任编辑|编辑|主编|记者|通讯员|作者|来源|出处|校对|审核|审校|编审|供稿|摄影|撰文|稿源)\s*[:：|丨]\s*[^\s，。,;；|丨]{1,20}"),
    re.compile(r"(?<![\u4e00-\u9fff])[文图]\s*[/:：|丨]\s*[^\s，。,;；]{1,12}"),
    re.compile(r"本报讯|本报[^\s，。]{0,6}(?:电|讯)(?=[\s（(]|$)|[\u4e00-\u9fff]{2,6}社[\u4e00-\u9fff]{2,5}\d{1,2}月\d{1,2}日电"),
]
_DATE = r"\d{4}\s*[-/.年]\s*\d{1,2}\s*[-/.月]\s*\d{1,2}\s*日?"
_TIME = r"\d{1,2}\s*[:：]\s*\d{2}(?:\s*[:：]\s*\d{2})?"
_TIMESTAMP = [
    re.compile(rf"(?:发布时间|发表时间|发布日期|更新时间|时间|日期)\s*[:：]\s*(?:{_DATE})?\s*(?:{_TIME})?"),
    re.compile(rf"(?:发表于|更新于|发布于|发布)\s*[:：]?\s*(?:{_DATE}\s*(?:{_TIME})?|{_TIME})"),
    re.compile(rf"{_DATE}\s*{_TIME}"),
    re.compile(r"(?<!\d)\d{4}[-/]\d{1,2}[-/]\d{1,2}(?!\d)"),
    re.compile(r"(?<![\d:])\d{1,2}:\d{2}:\d{2}(?![\d:])"),
    re.compile(r"\d+\s*(?:分钟|小时|天)前"),
]
_MEDIA = re.compile(
    r"[【\[〔（(]\s*(?:图片?|组图|图集|视频|音频|高清图|多图|图文|动图|GIF|gif)\s*[】\]〕）)]|"
    r"[【\[][^】\]\n]{0,8}(?:图片|视频|组图|图集)[^】\]\n]{0,8}[】\]]|"
    r"图片来源\s*[:：]?\s*[^\s，。]{0,20}|视频加载中[.…。]*|点击(?:播放|查看大图|图片查看)|播放视频|"
    r"\[(?:[\u4e00-\u9fff]{1,4})\]"  # emoticon codes such as [微笑]
)
_LONG_ID = re.compile(r"(?<!\d)\d{8,}(?!\d)")
_STRAY = re.compile(
    "["
    "\u0000-\u0008\u000b\u000c\u000e-\u001f\u007f-\u009f"  # control characters
    "\u200b-\u200f\u2028-\u202f\u2060-\u206f\ufeff"  # zero-width and direction marks
    "\u2190-\u21ff\u2300-\u23ff\u2460-\u24ff\u2500-\u27bf\u2900-\u297f\u2b00-\u2bff"  # arrows, boxes, shapes, dingbats
    "\u3200-\u32ff\ue000-\uf8ff\ufff0-\uffff"  # enclosed CJK, private use, specials (incl. U+FFFD)
    "\U0001f000-\U0001faff\U0001fc00-\U0001ffff"  # emoji and pictographs
    "|丨¦§¤¶•◇◆○●◎□■△▲▽▼★☆♀♂※→←↑↓"
    "]+"
)
_SOCIAL_LINE = re.compile(
    r"^[^\n]{0,80}(?:加微信|微信号|微信\s*[:：]|vx\s*[:：]|v信|wx\s*[:：]|qq\s*(?:号|群)?\s*[:：]|扣扣|公众号|二维码|扫一扫|扫码|长按识别|"
    r"联系电话|咨询电话|服务热线|热线电话|客服电话|电话\s*[:：]|手机\s*[:：]|联系方式|联系人\s*[:：]|"
    r"点击关注|关注我们|欢迎关注|一键关注|转发|点赞|在看|抖音号|微博\s*[:：@]|@[^\s]{1,20}\s*官方)[^\n]{0,80}$",
    _F,
)
_SOCIAL_INLINE = re.compile(
    r"(?:加微信|微信号|微信|vx|v信|wx|qq|扣扣)\s*(?:号|群)?\s*[:：]\s*[a-z0-9_-]{0,30}|"
    r"(?:联系电话|咨询电话|服务热线|热线电话|客服电话|电话|手机)\s*[:：]\s*[\d\s-]{0,20}",
    re.IGNORECASE,
)
_AD_LINE = re.compile(
    r"^\s*[【\[]?(?:广告|推广|赞助商?)[】\]]?(?:[:：\s][^\n]{0,40})?$|"
    r"^[^\n]{0,40}(?:立即购买|点击购买|马上抢购|限时抢购|秒杀|优惠券|火爆招商|招商加盟|加盟热线|代理加盟)[^\n]{0,40}$",
    _F,
)
_REPEAT = re.compile(r"(.)\1{3,}", re.DOTALL)
_SPACES = re.compile(r"[ \t\u00a0\u3000]+")
_NEWLINES = re.compile(r"\s*\n\s*")

CLEAN_STEPS: list[tuple[str, list[re.Pattern]]] = [
    ("html", _HTML),
    ("url_email", _URL_EMAIL),
    ("markdown_image", [_MD_IMAGE, re.compile(r"!\[[^\]\n]{0,200}\]\(\s*\)")]),
    ("pagination", _PAGINATION),
    ("breadcrumb", _BREADCRUMB),
    ("boilerplate", [_BOILERPLATE]),
    ("copyright", _COPYRIGHT),
    ("byline", _BYLINE),
    ("timestamp", _TIMESTAMP),
    ("media", [_MEDIA]),
    ("long_id", [_LONG_ID]),
    ("stray_symbol", [_STRAY]),
    ("ad_social", [_SOCIAL_LINE, _AD_LINE, _SOCIAL_INLINE]),
]


def clean_chinese_text(text: str) -> str:
    """Apply every cleaning rule in order, squeeze 4+ repeats to 3, collapse
    whitespace (runs of blanks -> one space, blank lines dropped)."""
    for _name, patterns in CLEAN_STEPS:
        for pat in patterns:
            text = pat.sub(" ", text)
    text = _REPEAT.sub(lambda m: m.group(1) * 3, text)
    text = _SPACES.sub(" ", text)
    text = _NEWLINES.sub("\n", text)
    return text.strip()


def spam_keep_probability(text: str) -> float:
    """1.0 for ordinary text; 0.05 for advertising (ad words near medical
    terms, WeChat/QQ contact IDs, official-account lures); 0.1 for
    medical/beauty promotion."""
    if _CONTACT.search(text) or _OFFICIAL_ACCOUNT.search(text) or _AD_MEDICAL.search(text):
        return 0.05
    if _PROMO.search(text):
        return 0.1
    return 1.0


def seeded_uniform(seed: int, text: str) -> float:
    """A uniform draw in [0, 1) from (seed, text): the same row gets the same
    draw whatever the block layout or execution order."""
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8, key=struct.pack("<q", seed)).digest()
    return int.from_bytes(digest, "little") / 2**64


class ChineseCleanAndFilterParams(NodeParams):
    input_col: str = "text"
    output_col: str = "clean_text"
    min_length: int = Field(10, ge=0)
    seed: int | None = None


@register
class ChineseCleanAndFilter(BatchNode):
    """Chinese web-text cleaning (SPEC §8). Rows with null/empty text, spam
    that loses the seeded draw, or cleaned text shorter than ``min_length``
    characters are dropped; ``output_col`` holds the cleaned text.

    Binary text columns are decoded as UTF-8 with invalid bytes replaced; the
    replacement characters are then removed as stray symbols."""

    type_name = "ChineseCleanAndFilter"
    Params = ChineseCleanAndFilterParams

    def apply(self, inputs: list[Stream], ctx: RunContext) -> Stream:
        self._seed = ctx.node_seed(self.params.seed, self.path)
        return super().apply(inputs, ctx)

    def transform(self, batch: pa.Table) -> pa.Table:
        p = self.params
        seed = getattr(self, "_seed", None)
        if seed is None:
            seed = RunContext().node_seed(p.seed, self.path)
        texts = text_column(self, batch, p.input_col)
        keep, cleaned = [], []
        for i, text in enumerate(texts):
            if not text or not text.strip():
                continue
            prob = spam_keep_probability(text)
            if prob < 1.0 and seeded_uniform(seed, text) >= prob:
                continue
            out = clean_chinese_text(text)
            if len(out) < p.min_length:
                continue
            keep.append(i)
            cleaned.append(out)
        batch = batch.take(pa.array(keep, pa.int64()))
        return with_column(batch, p.output_col, pa.array(cleaned, pa.string()))

    def output_schema(self, schema: pa.Schema) -> pa.Schema:
        require_text_field(self, schema, self.params.input_col)
        return schema_with(schema, self.params.output_col, pa.string())


__all__ = ["ConversationToParagraph", "ParseJsonString", "ChineseCleanAndFilter", "clean_chinese_text", "Any"]
